// Package vmtest starts throw-away QEMU virtual machines for migration tests
// and the demo, and runs a complete live migration between two of them.
//
// A VM is paused from the start (-S): its guest never runs, so its RAM and
// disk change only through migration. Its RAM is a shared file in /dev/shm
// and its disk a raw file, both of which the caller can hash to prove a
// migration copied everything:
//
//	src, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "src", Random: true})
//	...
//	dst, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "dst", Incoming: true})
//	...
//	res, err := vmtest.Migrate(ctx, src, dst, vmtest.MigrateOptions{
//		MainURI: "unix:" + dir + "/in.sock", IncomingURI: "unix:" + dir + "/in.sock",
//		NBDServerPath: dir + "/nbd.sock", NBDClientPath: dir + "/nbd.sock",
//	})
//	...
//	err = vmtest.CompareImages(src, dst)
//
// The RAM file is unlinked as soon as QEMU has mapped it, so nothing is left
// in /dev/shm even if the test process dies; QEMU itself is started with a
// parent-death signal. Always Close a VM (t.Cleanup) to stop QEMU promptly.
package vmtest
