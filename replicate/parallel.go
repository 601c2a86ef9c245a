package replicate

import (
	"context"

	"golang.org/x/sync/errgroup"
)

// parallel runs fn over items with at most n at a time; the first error
// cancels the others and is returned.
func parallel[T any](ctx context.Context, n int, items []T, fn func(context.Context, T) error) error {
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(max(n, 1))
	for _, it := range items {
		g.Go(func() error { return fn(ctx, it) })
	}
	return g.Wait()
}
