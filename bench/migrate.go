package main

import "context"

// Migrate runs the migration suite.
func (h *Harness) Migrate(ctx context.Context) {
	h.skip("migrate", "pre-copy migration", nil, "mdev migration driver not available in this tree yet")
}
