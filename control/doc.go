// Package control is migtun's local control API: the JSON types of the
// control endpoint that every migtun serve offers (on a UNIX socket, and
// optionally on TCP), its stable error codes, and the one typed Client
// that "migtun session", "migtun migrate" and tests use.
//
// The endpoint (served by package proxy) is HTTP with JSON; its paths are
// versioned:
//
//	GET    /healthz                      {"status":"ok"}
//	GET    /metrics                      Prometheus exposition
//	GET    /v1/sessions                  [SessionInfo…]
//	POST   /v1/sessions                  PrepareRequest → SessionInfo
//	GET    /v1/sessions/{id}             SessionInfo
//	POST   /v1/sessions/{id}/finish      ?grace=10s → FinishReport
//	POST   /v1/sessions/{id}/abort       {"reason":…} → SessionInfo
//	PUT    /v1/sessions/{id}/progress    MigrationProgress (from migtun migrate, for metrics)
//	POST   /v1/sessions/{id}/vm-{op}     a VM operation for the peer (package migrate's types)
//	GET    /v1/routes                    [RouteInfo…]
//	PUT    /v1/routes/{channel}          {"target":"unix:/path"}
//	DELETE /v1/routes/{channel}
//
// An error is {"error": "…", "code": "…"} with a 4xx or 5xx status; the
// code is one of the Code constants and is what programs branch on:
//
//	info, err := c.Session(ctx, id)
//	if errors.Is(err, control.ErrNotFound) { … }
package control
