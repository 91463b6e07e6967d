// Package qmp is a small client for the QEMU Machine Protocol (QMP).
//
// It owns one QMP connection per QEMU process and offers typed helpers for
// the commands migtun needs to drive a live migration: migration
// capabilities and parameters, migrate/migrate-incoming, the destination's
// NBD server and the source's block mirror jobs. Any other command can be
// sent with [Client.Execute].
//
// # Relation to go-qemu
//
// The client is built on github.com/digitalocean/go-qemu/qmp (imported here
// as goqmp). [*Client] implements goqmp.Monitor (Connect, Disconnect, Run,
// Events), so go-qemu's generated raw package (raw.NewMonitor(client)) and
// its qemu package (qemu.NewDomain(client, name)) run over this client's
// connection, alongside its own helpers. The client also speaks go-qemu's
// wire types: commands are encoded as goqmp.Command (plus an "id"), the
// greeting's version is decoded as goqmp.Version, and [Client.Events]
// delivers goqmp.Event values.
//
// What it does not use is go-qemu's transport, SocketMonitor, because of
// its defects:
//
//   - SocketMonitor does not match replies by id: it runs one command at a
//     time and takes the next non-event line as its reply, so commands
//     cannot overlap and one that is never answered blocks all others. This
//     client tags every command with an "id" and matches the reply by it,
//     so many goroutines may share one Client, and the late reply of a
//     command whose caller gave up is discarded.
//   - SocketMonitor's Run takes no context and can wait forever, and its
//     Events ignores its context. Every command here ([Client.Execute],
//     [Client.RunRaw]) takes a ctx bounding the write and the wait
//     (goqmp.Monitor's context-free Run waits until the reply arrives or the
//     client is closed), and an Events channel is closed when its ctx ends.
//   - SocketMonitor turns a QMP error into errors.New(desc), losing the
//     error class. Here a failed command returns an [*Error] carrying QEMU's
//     class (GenericError, CommandNotFound, DeviceNotFound, ...) and
//     description, also through Run and hence through go-qemu's raw and qemu
//     packages (use errors.As).
//   - SocketMonitor reads with a bufio.Scanner, so a reply longer than
//     64 KiB (query-qmp-schema, a large query-block) stops its reader for
//     good. This client decodes the stream with a json.Decoder, which has no
//     line limit.
//
// SocketMonitor also blocks its reader on a slow event consumer; here each
// channel from [Client.Events] has a bounded buffer ([EventBuffer]) and
// events that do not fit are dropped and counted ([Client.DroppedEvents]).
//
// Typical use:
//
//	c, err := qmp.Dial(ctx, "/run/vm/qmp.sock")
//	if err != nil {
//		return err
//	}
//	defer c.Close()
//	if err := c.MigrateSetCapabilities(ctx, map[string]bool{"multifd": true}); err != nil {
//		return err
//	}
//	if err := c.Migrate(ctx, "unix:/run/migtun/main.sock"); err != nil {
//		return err
//	}
//	info, err := c.WaitMigration(ctx, 100*time.Millisecond, nil)
//
// or, through go-qemu's generated API:
//
//	st, err := raw.NewMonitor(c).QueryStatus()
//
// The wire protocol is described in QEMU's docs/interop/qmp-spec.txt. QEMU
// 7.2 is the reference version; the helpers send the argument shapes it
// accepts (for example the legacy "addr" form of nbd-server-start).
package qmp
