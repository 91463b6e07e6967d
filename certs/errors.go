package certs

import "errors"

// Sentinel errors returned (wrapped) by this package. Compare with errors.Is.
var (
	// ErrExists reports that InitCA or Issue would overwrite an existing file.
	ErrExists = errors.New("certs: file already exists")

	// ErrInvalidName reports a host name or subject alternative name that
	// Issue cannot use.
	ErrInvalidName = errors.New("certs: invalid name")

	// ErrInvalidConfig reports a Config that Load cannot use.
	ErrInvalidConfig = errors.New("certs: invalid config")

	// ErrNoCertificate reports a PEM file that holds no certificate.
	ErrNoCertificate = errors.New("certs: no certificate in file")

	// ErrPeerNotAllowed reports a verified peer whose names match none of
	// Config.AllowedPeers. The wrapping error names the peer.
	ErrPeerNotAllowed = errors.New("certs: peer not allowed")
)
