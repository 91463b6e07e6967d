// Package kubernetes holds migtun's Kubernetes manifests: a DaemonSet on
// the host network with the socket directory shared through a hostPath,
// cert-manager issuers and the certificate, a Service and a PodMonitor for
// Prometheus, and the kustomization tying them together. Its tests decode
// each manifest strictly into the API types and check the container's
// arguments with migtun serve's own flag parser.
package kubernetes
