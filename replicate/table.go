package replicate

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// querier is what both a pool and a transaction offer.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ErrNoKey: delta apply and batched copy need a key.
var ErrNoKey = errors.New("table has no usable key (a primary key, or a unique index on NOT NULL columns, is required)")

// table is what the engine knows of the original table.
type table struct {
	OID          uint32
	Schema, Name string
	Owner        string
	Kind         string // r, p
	Persistence  string // p, u
	Tablespace   string // empty: database default
	AccessMethod string
	RelOptions   []string
	ToastOptions []string
	Columns      []column
	Key          []string // key column names (original names)
	// KeyPerLeaf: a partitioned table without a key of its own whose local
	// leaves all have one on the same columns. Not unique across the tree,
	// which the delta apply (set-based per key value) and the copy by key
	// value windows do not need.
	KeyPerLeaf   bool
	replIdentKey bool // the key is the replica identity index when there is one (logical capture)
	KeyTypes     []string
	EstRows      int64
	Fingerprint  string // of columns, indexes and constraints: concurrent DDL changes it
	PartKey      string // PARTITION BY clause of a partitioned table
	Partitions   []partition
	Parent       *parentTable // partial mode: the table is a partition or an inheritance child
	Version      int          // server_version_num, read once with the table
}

// parentTable is the parent a partition or an inheritance child is attached
// back to at the switch (partial mode, the original tool's --partial-mode).
type parentTable struct {
	OID    uint32 `json:"oid"`
	Schema string `json:"schema"`
	Name   string `json:"name"`
	// Bound is the partition bound ("FOR VALUES ...", "DEFAULT"); empty for
	// an inheritance child.
	Bound string `json:"bound"`
	// BoundCheck is the partition constraint, pre-created on the shadow as a
	// CHECK so that ATTACH PARTITION needs no scan under the lock.
	BoundCheck string `json:"bound_check"`
	// The parent's DEFAULT partition, when the table is another partition:
	// see guardDefaultPartition.
	DefaultSchema string `json:"default_schema,omitempty"`
	DefaultName   string `json:"default_name,omitempty"`
}

// boundCheckName names the shadow's CHECK that proves the partition bound.
const boundCheckName = "tat_partition_bound"

func (p *parentTable) ident() string { return ident(p.Schema, p.Name) }

// partition is one table of a partitioned table's tree, parents first.
type partition struct {
	OID          uint32   `json:"oid"`
	Schema       string   `json:"schema"`
	Name         string   `json:"name"`
	ParentSchema string   `json:"parent_schema"`
	Parent       string   `json:"parent"`
	Bound        string   `json:"bound"`    // FOR VALUES ... | DEFAULT
	PartKey      string   `json:"part_key"` // for an intermediate partitioned table
	Persistence  string   `json:"persistence"`
	Tablespace   string   `json:"tablespace"`
	RelOptions   []string `json:"reloptions"`
	// Inherit: an inheritance child (no Bound). Its own columns and its
	// copy lists differ from the root's.
	Inherit bool `json:"inherit,omitempty"`
	// Foreign: a foreign-table partition or inheritance child. It holds no
	// local rows: it is neither copied nor captured, and at the switch it
	// is replaced by a foreign table of the same definition to which the
	// ALTER applied (see foreign.go).
	Foreign     bool     `json:"foreign,omitempty"`
	InsertCols  []string `json:"insert_cols,omitempty"`
	SelectExprs []string `json:"select_exprs,omitempty"`
}

// qPartitions lists the partition tree below $1, parents before children.
const qPartitions = `
with recursive tree(oid, level) as (
  select inhrelid, 1 from pg_inherits where inhparent = $1
  union all
  select h.inhrelid, t.level + 1 from tree t join pg_inherits h on h.inhparent = t.oid)
select c.oid, n.nspname, c.relname, pn.nspname, p.relname, pg_get_expr(c.relpartbound, c.oid),
       case when c.relkind = 'p' then pg_get_partkeydef(c.oid) else '' end, c.relkind::text,
       c.relpersistence::text, coalesce(ts.spcname, ''), coalesce(c.reloptions, '{}'), c.relispartition
from tree t join pg_class c on c.oid = t.oid join pg_namespace n on n.oid = c.relnamespace
join pg_inherits h on h.inhrelid = c.oid join pg_class p on p.oid = h.inhparent
join pg_namespace pn on pn.oid = p.relnamespace
left join pg_tablespace ts on ts.oid = c.reltablespace
order by t.level, c.relname`

type column struct {
	Num         int
	Name        string
	Type        string // format_type, schema-qualified when needed
	Collation   string // qualified, empty when the type's default
	NotNull     bool
	NotNullName string // name of its NOT NULL constraint (PostgreSQL 18+)
	Default     string
	Generated   string // generation expression
	Virtual     bool   // a VIRTUAL generated column (PostgreSQL 18+), else STORED
	Identity    string // a (always), d (by default), empty
	IdentOpts   string
	Storage     string // SET STORAGE value when not the type's default
	Compress    string
	StatTgt     int
	Options     []string
}

// ident quotes a schema-qualified name.
func ident(schema, name string) string { return pgx.Identifier{schema, name}.Sanitize() }

func qi(name string) string { return pgx.Identifier{name}.Sanitize() }

func (t *table) ident() string { return ident(t.Schema, t.Name) }

// shadowName derives the name of a helper table: "orders" -> "orders__tat_new".
// Names at 63 bytes are shortened on a rune boundary, so the suffix always fits.
func shadowName(name, suffix string) string {
	return truncName(name, 63-len(suffix)) + suffix
}

func truncName(s string, max int) string {
	if len(s) <= max {
		return s
	}
	s = s[:max]
	for !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// Catalog reads are made with search_path = pg_catalog so that every
// definition PostgreSQL prints (types, defaults, index and constraint
// definitions) comes out schema-qualified and can be replayed anywhere.
const catalogPath = "set local search_path = pg_catalog, pg_temp"

const qTable = `
select c.oid, n.nspname, c.relname, pg_get_userbyid(c.relowner), c.relkind::text, c.relpersistence::text,
       coalesce(ts.spcname, ''), coalesce(am.amname, ''),
       coalesce(c.reloptions, '{}'), coalesce(tc.reloptions, '{}'), greatest(c.reltuples, 0)::bigint
from pg_class c join pg_namespace n on n.oid = c.relnamespace
left join pg_tablespace ts on ts.oid = c.reltablespace
left join pg_am am on am.oid = c.relam
left join pg_class tc on tc.oid = c.reltoastrelid
where c.oid = $1`

// qColCompression is the column's compression method; pg_attribute has
// attcompression since PostgreSQL 14 (on 13 the empty string stands in).
const qColCompression = `case a.attcompression when 'p' then 'pglz' when 'l' then 'lz4' else '' end`

// qNotNullInvalid is true when the column's NOT NULL is a NOT VALID
// constraint: since PostgreSQL 18 NOT NULL is a pg_constraint row (contype
// 'n', named, possibly NOT VALID) and attnotnull is set even when it is not
// valid. Before 18 there are no such rows.
const qNotNullInvalid = `exists (select 1 from pg_constraint nn where nn.conrelid = a.attrelid and nn.contype = 'n'
                    and nn.conkey[1] = a.attnum and not nn.convalidated)`

// qColumns reads the columns. attstattarget is NULL for the default since
// PostgreSQL 17 and -1 before.
const qColumns = `
select a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
       case when a.attcollation <> t.typcollation and a.attcollation <> 0
            then quote_ident(cn.nspname) || '.' || quote_ident(co.collname) else '' end,
       a.attnotnull and not ` + qNotNullInvalid + `,
       case when a.attgenerated = '' then coalesce(pg_get_expr(d.adbin, d.adrelid), '') else '' end,
       case when a.attgenerated <> '' then pg_get_expr(d.adbin, d.adrelid) else '' end,
       a.attidentity::text,
       coalesce((select format('INCREMENT BY %s START WITH %s CACHE %s %s', s.seqincrement, s.seqstart, s.seqcache,
                 case when s.seqcycle then 'CYCLE' else 'NO CYCLE' end)
                 || case when s.seqincrement > 0 and s.seqmin <> 1 then ' MINVALUE ' || s.seqmin else '' end
                 || case when s.seqmax not in (32767, 2147483647, 9223372036854775807) and s.seqincrement > 0
                         then ' MAXVALUE ' || s.seqmax else '' end
                 from pg_sequence s where a.attidentity <> ''
                  and s.seqrelid = pg_get_serial_sequence(format('%I.%I', $2::text, $3::text), a.attname)::regclass), ''),
       case when a.attstorage <> t.typstorage then
            case a.attstorage when 'p' then 'PLAIN' when 'e' then 'EXTERNAL' when 'm' then 'MAIN' else 'EXTENDED' end
            else '' end,
       ` + qColCompression + `,
       coalesce(a.attstattarget, -1)::int,
       coalesce(a.attoptions, '{}'),
       coalesce((select nn.conname from pg_constraint nn where nn.conrelid = a.attrelid and nn.contype = 'n'
                   and nn.conkey[1] = a.attnum and nn.convalidated), ''),
       a.attgenerated = 'v'
from pg_attribute a
join pg_type t on t.oid = a.atttypid
left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
left join pg_collation co on co.oid = a.attcollation
left join pg_namespace cn on cn.oid = co.collnamespace
where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
order by a.attnum`

// qKey picks the key for copy ranges and delta apply: the primary key, else
// the narrowest valid, non-partial, non-expression unique index on NOT NULL
// columns; with $2 (logical capture) the replica identity index first, since
// its columns are what the stream carries of a deleted or updated row.
const qKey = `
select array_agg(a.attname order by k.ord), array_agg(format_type(a.atttypid, a.atttypmod) order by k.ord)
from (
  select i.indexrelid, i.indkey
  from pg_index i
  where i.indrelid = $1 and i.indisunique and i.indisvalid and i.indimmediate
    and i.indpred is null and i.indexprs is null
    and not exists (select 1 from unnest(i.indkey[0:i.indnkeyatts - 1]) k(n) join pg_attribute a
                    on a.attrelid = i.indrelid and a.attnum = k.n where not a.attnotnull or ` + qNotNullInvalid + `)
  order by i.indisreplident and $2 desc, i.indisprimary desc, i.indnatts, i.indexrelid
  limit 1) i,
  unnest(i.indkey[0:(select indnkeyatts from pg_index where indexrelid = i.indexrelid) - 1]) with ordinality k(n, ord)
  join pg_attribute a on a.attrelid = $1 and a.attnum = k.n
group by i.indexrelid`

// loadTable reads the table's definition. rel is a quoted, possibly
// schema-qualified name resolved with the session's search_path.
// With partialTree a partitioned partition is migrated with its partitions
// and attached back (the original's --partial-mode).
func loadTable(ctx context.Context, conn pgx.Tx, schema, name string, replIdentKey, partialTree bool) (*table, error) {
	var oid uint32
	var rel string
	if schema != "" {
		rel = ident(schema, name)
	} else {
		rel = qi(name)
	}
	if err := conn.QueryRow(ctx, "select coalesce(to_regclass($1)::oid, 0)", rel).Scan(&oid); err != nil {
		return nil, fmt.Errorf("resolve table %s: %w", rel, err)
	}
	if oid == 0 {
		return nil, fmt.Errorf("table %s does not exist", rel)
	}
	if _, err := conn.Exec(ctx, catalogPath); err != nil {
		return nil, err
	}
	t := &table{}
	err := conn.QueryRow(ctx, qTable, oid).Scan(&t.OID, &t.Schema, &t.Name, &t.Owner, &t.Kind, &t.Persistence,
		&t.Tablespace, &t.AccessMethod, &t.RelOptions, &t.ToastOptions, &t.EstRows)
	if err != nil {
		return nil, fmt.Errorf("read table %s: %w", rel, err)
	}
	if err := loadPartitions(ctx, conn, t, rel, partialTree); err != nil {
		return nil, err
	}
	if err := conn.QueryRow(ctx, "select current_setting('server_version_num')::int").Scan(&t.Version); err != nil {
		return nil, err
	}
	cols, err := loadColumns(ctx, conn, t.Version, oid, t.Schema, t.Name)
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", rel, err)
	}
	t.Columns = cols
	t.replIdentKey = replIdentKey
	err = conn.QueryRow(ctx, qKey, oid, replIdentKey).Scan(&t.Key, &t.KeyTypes)
	if errors.Is(err, pgx.ErrNoRows) && t.Kind == "p" {
		err = leafKey(ctx, conn, t, rel)
	}
	if errors.Is(err, pgx.ErrNoRows) || err == nil && len(t.Key) == 0 {
		return nil, fmt.Errorf("%s: %w", rel, ErrNoKey)
	}
	if err != nil {
		return nil, fmt.Errorf("find key of %s: %w", rel, err)
	}
	if err := checkForeignMembers(ctx, conn, t, rel); err != nil {
		return nil, err
	}
	if err := checkInheritedKeys(ctx, conn, t); err != nil {
		return nil, err
	}
	if t.Fingerprint, err = treeFingerprint(ctx, conn, t.OID, t.Partitions); err != nil {
		return nil, fmt.Errorf("fingerprint %s: %w", rel, err)
	}
	if t.inherits() {
		err := conn.QueryRow(ctx, `select coalesce(sum(greatest(reltuples, 0)), 0)::bigint from pg_class
			where oid = $1 or oid = any($2::oid[])`, t.OID, t.partitionOIDs()).Scan(&t.EstRows)
		if err != nil {
			return nil, fmt.Errorf("estimate rows of %s: %w", rel, err)
		}
	}
	if _, err := conn.Exec(ctx, "reset search_path"); err != nil {
		return nil, err
	}
	return t, nil
}

// qFingerprint summarises the table's shape. The cut-over compares it with
// the one taken in prepare, so a concurrent ALTER, CREATE INDEX or ADD
// CONSTRAINT on the original makes the job fail cleanly instead of swapping
// in a table of a stale shape. Run it with search_path = pg_catalog.
const qFingerprint = `
select md5(concat_ws('|',
  (select string_agg(a.attname || ':' || a.atttypid || ':' || a.atttypmod || ':' || a.attnotnull || ':' ||
                     a.attisdropped || ':' || a.attgenerated::text || a.attidentity::text || ':' ||
                     coalesce(pg_get_expr(d.adbin, d.adrelid), ''), ',' order by a.attnum)
     from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
    where a.attrelid = $1 and a.attnum > 0),
  (select string_agg(x, ',' order by x) from (select pg_get_indexdef(i.indexrelid)
     from pg_index i where i.indrelid = $1) i(x)),
  (select string_agg(x, ',' order by x) from (select c.conname || ' ' || pg_get_constraintdef(c.oid)
     from pg_constraint c where c.conrelid = $1) c(x)),
  (select relpersistence::text || reltablespace::text || coalesce(reloptions::text, '') from pg_class where oid = $1)))`

// loadColumns reads a table's columns (qColumns).
func loadColumns(ctx context.Context, conn querier, ver int, oid uint32, schema, name string) ([]column, error) {
	qCols := qColumns
	if ver < 140000 {
		qCols = strings.Replace(qCols, qColCompression, "''", 1)
	}
	rows, err := conn.Query(ctx, qCols, oid, schema, name)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var cols []column
	for rows.Next() {
		var c column
		if err := rows.Scan(&c.Num, &c.Name, &c.Type, &c.Collation, &c.NotNull, &c.Default, &c.Generated,
			&c.Identity, &c.IdentOpts, &c.Storage, &c.Compress, &c.StatTgt, &c.Options, &c.NotNullName, &c.Virtual); err != nil {
			return nil, err
		}
		cols = append(cols, c)
	}
	return cols, rows.Err()
}

// treeFingerprint is qFingerprint of the table and of every table of its
// partition or inheritance tree: DDL on any of them fails the switch.
func treeFingerprint(ctx context.Context, q querier, root uint32, parts []partition) (string, error) {
	var fp string
	if len(parts) == 0 {
		err := q.QueryRow(ctx, qFingerprint, root).Scan(&fp)
		return fp, err
	}
	// One round trip for the whole tree: the switch runs it under its lock.
	err := q.QueryRow(ctx, qTreeFingerprint, append([]uint32{root}, oidsOf(parts)...)).Scan(&fp)
	return fp, err
}

// qTreeFingerprint is qFingerprint of every table of $1, in order; for one
// table, the same as qFingerprint.
var qTreeFingerprint = `select string_agg((` + strings.ReplaceAll(qFingerprint, "$1", "u.oid") + `), ',' order by u.ord)
	from unnest($1::oid[]) with ordinality u(oid, ord)`

func oidsOf(parts []partition) []uint32 {
	oids := make([]uint32, len(parts))
	for i, p := range parts {
		oids[i] = p.OID
	}
	return oids
}

func (t *table) partitionOIDs() []uint32 { return oidsOf(t.Partitions) }

// columnDDL renders one column for CREATE TABLE.
func columnDDL(c column) string {
	var b strings.Builder
	b.WriteString(qi(c.Name))
	b.WriteString(" ")
	b.WriteString(c.Type)
	if c.Collation != "" {
		b.WriteString(" COLLATE " + c.Collation)
	}
	switch {
	case c.Generated != "":
		if c.Virtual {
			b.WriteString(" GENERATED ALWAYS AS (" + c.Generated + ") VIRTUAL")
		} else {
			b.WriteString(" GENERATED ALWAYS AS (" + c.Generated + ") STORED")
		}
	case c.Identity == "a":
		b.WriteString(" GENERATED ALWAYS AS IDENTITY (" + c.IdentOpts + ")")
	case c.Identity == "d":
		b.WriteString(" GENERATED BY DEFAULT AS IDENTITY (" + c.IdentOpts + ")")
	case c.Default != "":
		b.WriteString(" DEFAULT " + c.Default)
	}
	if c.NotNull {
		if c.NotNullName != "" {
			b.WriteString(" CONSTRAINT " + qi(c.NotNullName))
		}
		b.WriteString(" NOT NULL")
	}
	return b.String()
}

// loadParent reads the parent of a partition or an inheritance child and
// refuses what the switch could not attach back without a scan under lock.
func loadParent(ctx context.Context, conn pgx.Tx, t *table, rel string, isPartition, partialTree bool) error {
	rows, err := conn.Query(ctx, `select p.oid, n.nspname, p.relname, coalesce(pg_get_expr(c.relpartbound, c.oid), ''),
		coalesce(pg_get_partition_constraintdef(c.oid), '')
		from pg_inherits h join pg_class p on p.oid = h.inhparent join pg_namespace n on n.oid = p.relnamespace
		join pg_class c on c.oid = h.inhrelid where h.inhrelid = $1`, t.OID)
	if err != nil {
		return fmt.Errorf("read parent of %s: %w", rel, err)
	}
	var parents []parentTable
	for rows.Next() {
		var p parentTable
		var check string
		if err := rows.Scan(&p.OID, &p.Schema, &p.Name, &p.Bound, &check); err != nil {
			rows.Close()
			return fmt.Errorf("read parent of %s: %w", rel, err)
		}
		if isPartition {
			p.BoundCheck = check
		} else {
			p.Bound = ""
		}
		parents = append(parents, p)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	switch {
	case len(parents) == 0:
		return nil
	case len(parents) > 1:
		return fmt.Errorf("%s inherits from %d tables; partial mode attaches a child back to one parent", rel, len(parents))
	case isPartition && t.Kind == "p" && !partialTree:
		return fmt.Errorf("%s is a partitioned partition of %s: alter %[2]s, one leaf partition, or this one with its partitions in partial mode (--partial-mode, partial_mode => true)", rel, parents[0].ident())
	}
	p := parents[0]
	// Foreign keys of or to the parent's tree are cloned to, or check,
	// every partition: attaching a new one would validate them by a scan
	// under the lock.
	var fks int
	if err := conn.QueryRow(ctx, `select count(*) from pg_constraint where contype = 'f'
		and (conrelid = $1 or confrelid = $1 or conrelid = $2 and conparentid <> 0 or confrelid = $2)`, p.OID, t.OID).Scan(&fks); err != nil {
		return err
	}
	if fks > 0 && isPartition {
		return fmt.Errorf("%s: its partitioned table %s has foreign keys (or is referenced by one), which attaching the new partition would validate by a scan under lock; alter %[2]s instead", rel, p.ident())
	}
	if isPartition && p.Bound != "DEFAULT" {
		err := conn.QueryRow(ctx, `select n.nspname, c.relname from pg_partitioned_table pt
			join pg_class c on c.oid = pt.partdefid join pg_namespace n on n.oid = c.relnamespace
			where pt.partrelid = $1`, p.OID).Scan(&p.DefaultSchema, &p.DefaultName)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("read default partition of %s: %w", p.ident(), err)
		}
	}
	t.Parent = &p
	return nil
}

// checkInheritanceTree refuses inheritance trees the engine cannot migrate:
// a child with several parents, a tree that is also a child (partial mode
// is for leaves), a child without a key on the root's key columns (its delta
// apply and copy go by that key).
func checkInheritanceTree(ctx context.Context, conn pgx.Tx, t *table, rel string) error {
	var children []uint32
	for _, p := range t.Partitions {
		if p.Inherit {
			children = append(children, p.OID)
		}
	}
	if len(children) == 0 {
		return nil
	}
	if t.Parent != nil {
		return fmt.Errorf("%s is an inheritance child with children of its own: alter the root of its tree", rel)
	}
	var multi string
	if err := conn.QueryRow(ctx, `select coalesce(min(inhrelid::regclass::text), '') from pg_inherits
		where inhrelid = any($1::oid[]) group by inhrelid having count(*) > 1 limit 1`, children).Scan(&multi); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("read inheritance of %s: %w", rel, err)
	}
	if multi != "" {
		return fmt.Errorf("%s has an inheritance child with several parents (%s), which cannot be migrated with it", rel, multi)
	}
	return nil
}

// checkInheritedKeys: every child of an inheritance tree needs a key on the
// root's key columns.
func checkInheritedKeys(ctx context.Context, conn pgx.Tx, t *table) error {
	for _, p := range t.Partitions {
		if !p.Inherit || p.Foreign {
			continue
		}
		var key []string
		var types []string
		err := conn.QueryRow(ctx, qKey, p.OID, t.replIdentKey).Scan(&key, &types)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("find key of %s: %w", ident(p.Schema, p.Name), err)
		}
		if strings.Join(key, "\x00") != strings.Join(t.Key, "\x00") {
			return fmt.Errorf("%w: inheritance child %s has none on (%s), the key of %s",
				ErrNoKey, ident(p.Schema, p.Name), strings.Join(t.Key, ", "), t.ident())
		}
	}
	return nil
}

// inherits reports whether the table is the root of an inheritance tree.
func (t *table) inherits() bool {
	return len(t.Partitions) > 0 && t.Partitions[0].Inherit
}

// loadPartitions reads a partitioned table's tree and refuses what cannot
// be swapped faithfully: temporary tables, system schemas, a partition on
// its own, inheritance (non-partition) children, foreign-table partitions.
func loadPartitions(ctx context.Context, conn pgx.Tx, t *table, rel string, partialTree bool) error {
	var isPartition bool
	if err := conn.QueryRow(ctx, "select relispartition from pg_class where oid = $1", t.OID).Scan(&isPartition); err != nil {
		return err
	}
	switch {
	case t.Persistence == "t":
		return fmt.Errorf("%s is a temporary table: other sessions cannot see it", rel)
	case t.Schema == "pg_catalog" || t.Schema == "information_schema" || t.Schema == "pg_toast":
		return fmt.Errorf("%s is a system catalog", rel)
	case t.Kind != "r" && t.Kind != "p":
		return fmt.Errorf("%s is not a table (relkind %s)", rel, t.Kind)
	}
	if err := loadParent(ctx, conn, t, rel, isPartition, partialTree); err != nil {
		return err
	}
	rows, err := conn.Query(ctx, qPartitions, t.OID)
	if err != nil {
		return fmt.Errorf("read partitions of %s: %w", rel, err)
	}
	defer rows.Close()
	for rows.Next() {
		var p partition
		var kind string
		var isPart bool
		var bound *string
		if err := rows.Scan(&p.OID, &p.Schema, &p.Name, &p.ParentSchema, &p.Parent, &bound, &p.PartKey, &kind,
			&p.Persistence, &p.Tablespace, &p.RelOptions, &isPart); err != nil {
			return fmt.Errorf("read partitions of %s: %w", rel, err)
		}
		p.Foreign = kind == "f"
		if !isPart {
			// An inheritance child: migrated with the tree, its shadow a
			// child of its parent's shadow (see plan.inherits).
			p.Inherit = true
			t.Partitions = append(t.Partitions, p)
			continue
		}
		p.Bound = *bound
		t.Partitions = append(t.Partitions, p)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	rows.Close()
	if err := checkInheritanceTree(ctx, conn, t, rel); err != nil {
		return err
	}
	if t.Kind == "p" {
		if err := conn.QueryRow(ctx, `select pg_get_partkeydef($1), coalesce((select sum(greatest(c.reltuples, 0))::bigint
			from pg_partition_tree($1) pt join pg_class c on c.oid = pt.relid where pt.isleaf), 0)`, t.OID).Scan(&t.PartKey, &t.EstRows); err != nil {
			return fmt.Errorf("read partition key of %s: %w", rel, err)
		}
	}
	return nil
}
