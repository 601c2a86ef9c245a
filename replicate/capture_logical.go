package replicate

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// logicalCapture is capture => 'logical' (not implemented yet).
type logicalCapture struct{ m *migration }

func newLogicalCapture(m *migration) capture { return &logicalCapture{m: m} }

func (c *logicalCapture) start(context.Context) (string, error) {
	return "", fmt.Errorf("%w: capture 'logical' is not available yet; use 'trigger'", ErrBadCommand)
}
func (c *logicalCapture) copied(context.Context) error       { return nil }
func (c *logicalCapture) sync(context.Context, pgx.Tx) error { return nil }
func (c *logicalCapture) stop(context.Context) error         { return nil }
func (c *logicalCapture) lagBytes() int64                    { return 0 }
