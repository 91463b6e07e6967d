package qmp_test

import (
	"context"
	"fmt"
	"time"

	"github.com/migtun/migtun/qmp"
)

// A source migrates with four multifd channels and reports progress.
func ExampleClient_WaitMigration() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, err := qmp.Dial(ctx, "/run/vm/qmp.sock")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	if err := c.MigrateSetCapabilities(ctx, map[string]bool{"multifd": true}); err != nil {
		fmt.Println(err)
		return
	}
	if err := c.MigrateSetParameters(ctx, map[string]any{"multifd-channels": 4, "max-bandwidth": int64(10 << 30)}); err != nil {
		fmt.Println(err)
		return
	}
	if err := c.Migrate(ctx, "unix:/run/migtun/main.sock"); err != nil {
		fmt.Println(err)
		return
	}
	info, err := c.WaitMigration(ctx, 100*time.Millisecond, func(i *qmp.MigrationInfo) {
		if i.RAM != nil {
			fmt.Printf("%s: %d of %d bytes left\n", i.Status, i.RAM.Remaining, i.RAM.Total)
		}
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("done in %d ms, downtime %d ms\n", info.TotalTime, info.Downtime)
}
