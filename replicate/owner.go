package replicate

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// pinnedPath is set for maintenance operations (index builds, ANALYZE),
// whose definitions were read schema-qualified: an index expression or a
// default calling an unqualified function cannot be hijacked by an object
// planted earlier in the search_path.
const pinnedPath = "SET LOCAL search_path = pg_catalog, pg_temp"

// asOwner makes m.pool a pool whose sessions run as the table's owner
// (SET ROLE), so the command, the copy and the index builds run with the
// owner's privileges, never with the sidecar's: a default, a USING
// expression or an index expression cannot do what the owner could not.
// The cut-over and cleanup keep the caller's pool (m.admin), because they
// drop and re-create dependents that other roles may own.
func (m *migration) asOwner(ctx context.Context) (func(), error) {
	var owner, me string
	err := m.admin.QueryRow(ctx, `select pg_get_userbyid(relowner)::text, current_user::text from pg_class where oid = to_regclass($1)`,
		m.tableRef()).Scan(&owner, &me)
	if err != nil {
		return nil, fmt.Errorf("%w: find the owner of %s: %v", ErrBadCommand, m.tableRef(), err)
	}
	cfg := m.admin.Config().Copy()
	// row_security = off: a query that row-level security would filter
	// fails instead (as in pg_dump), so the copy can never silently miss
	// rows that policies hide from the owner (FORCE ROW LEVEL SECURITY).
	set := "SET row_security = off"
	if owner != me {
		set += "; SET ROLE " + pgx.Identifier{owner}.Sanitize()
	}
	prev := cfg.AfterConnect
	cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		if prev != nil {
			if err := prev(ctx, c); err != nil {
				return err
			}
		}
		_, err := c.Exec(ctx, set)
		return err
	}
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := p.Exec(ctx, "select 1"); err != nil {
		p.Close()
		return nil, fmt.Errorf("%w: cannot act as the owner %s of %s (the sidecar's role must be a member of it): %v", ErrBadCommand, owner, m.tableRef(), err)
	}
	m.pool = p
	return func() { m.pool = m.admin; p.Close() }, nil
}
