// Package systemd holds migtun's systemd unit (migtun.service), the
// environment file it reads (migtun.env) and the sysusers.d entry of its
// user (migtun.sysusers). Its tests verify the unit with systemd-analyze,
// bound its exposure score, and run its ExecStart command line.
package systemd
