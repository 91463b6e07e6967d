// Package migrate performs a whole QEMU live migration, disks included,
// through migtun sessions, driving QEMU over QMP on both hosts. The steps
// follow libvirt's version 3 protocol:
//
//   - Begin (source): read the VM's run state and block devices, choose
//     the disks to copy.
//   - Prepare: create a session with channels main and nbd through the
//     local migtun's control endpoint, then ask the peer (vm-prepare) to
//     make its registered VM wait: capabilities, multifd channels, the NBD
//     server with each target disk exported writable (a missing disk or one
//     of another size is an error before anything moves), migrate-incoming.
//   - Perform (source): mirror each disk into the session's nbd channel,
//     wait until every mirror is ready, set the bandwidth, downtime limit
//     and capabilities, migrate into the session's main channel, follow
//     the progress, complete the mirrors.
//   - Finish (destination, vm-finish): wait for completion, stop the NBD
//     server, resume the guest unless asked not to.
//   - Confirm (source): leave the source paused or quit it, finish the
//     session and compare both hosts' counts.
//
// On failure at any step the migration and the mirrors are cancelled, the
// source guest is left as it was, the destination is told to abort and the
// session is aborted; the error names the step and carries QEMU's text.
//
// Postcopy is the exception: once it has begun the destination runs the
// guest, so the source is never resumed. A broken channel pauses both
// QEMUs; Run then asks the destination (recover) to listen again on the
// session's main route and resumes the source into the same session, until
// Options.RecoverTimeout. A migration that fails in postcopy (not
// recovered in time, a timeout, a signal) fails with [ErrPostcopyFailed],
// both QEMUs left as they are for a recovery by hand.
//
// [Controller] is the destination's side, plugged into the proxy as its
// [proxy.VMHandler]; [Run] is the source's side. The VM operations and
// their types are in vm.go; they travel inside the session's control
// exchange, which package proxy carries without reading them.
package migrate
