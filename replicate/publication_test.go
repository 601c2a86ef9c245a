package replicate_test

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// conninfo turns a test database URL into a libpq conninfo for CREATE
// SUBSCRIPTION (host 127.0.0.1: the subscriber connects over TCP).
func conninfo(t *testing.T, u string) string {
	t.Helper()
	p, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	q := func(s string) string {
		return "'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), "'", `\'`) + "'"
	}
	host := p.Hostname()
	if host == "" || host == "localhost" {
		host = "127.0.0.1"
	}
	ci := fmt.Sprintf("host=%s port=%s dbname=%s user=%s", q(host), q(p.Port()), q(strings.TrimPrefix(p.Path, "/")), q(p.User.Username()))
	if pw, ok := p.User.Password(); ok {
		ci += " password=" + q(pw)
	}
	return ci
}

// checksum: count and md5 of a table's rows in key order, as text.
func checksum(t *testing.T, pool *pgxpool.Pool, table string) string {
	t.Helper()
	var s string
	if err := pool.QueryRow(context.Background(), fmt.Sprintf(`select count(*)::text || ':' ||
		coalesce(md5(string_agg(r::text, ',' order by id)), '') from %s r`, table)).Scan(&s); err != nil {
		t.Fatalf("checksum %s: %v", table, err)
	}
	return s
}

// A server with a FOR ALL TABLES publication and a subscriber (a logical
// replica on a second cluster): the job succeeds, the shadow, delta and
// state never reach the subscriber, and the subscriber keeps replicating
// the table (under its name, new type and all) and the others, during and
// after the job.
func TestPublicationForAllTables(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own cluster")
	}
	sub, err := testpg.Start(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Stop)
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		if e.str("show wal_level") != "logical" {
			t.Skip("needs wal_level = logical on the test server")
		}
		const shape = `create table t (id int primary key, v text, n int);
			create table control (id int primary key, v text, n int);
			create table other (id bigint primary key, v text)`
		e.exec(shape)
		// A UNIQUE index besides the key: the copy's changes are applied
		// (DELETE from the shadow) before the key index exists.
		e.exec(`create unique index t_n_id on t (n, id)`)
		e.exec(`insert into t select g, md5(g::text), g from generate_series(1, 3000) g;
			insert into control select * from t`)
		e.exec(`create publication p for all tables`)

		surl := testpg.NewDBOn(t, sub.URL)
		spool := testpg.Pool(t, surl)
		ctx := context.Background()
		if _, err := spool.Exec(ctx, shape); err != nil {
			t.Fatal(err)
		}
		slot := fmt.Sprintf("tat_sub_%d", time.Now().UnixNano())
		if _, err := spool.Exec(ctx, fmt.Sprintf("create subscription s connection %s publication p with (slot_name = %s)",
			quoteLit(conninfo(t, e.url)), slot)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { spool.Exec(context.Background(), "drop subscription if exists s") }) //nolint:errcheck
		waitFor(t, 60*time.Second, "the subscription's initial copy", func() bool {
			var n int
			_ = spool.QueryRow(ctx, "select count(*) from pg_subscription_rel where srsubstate <> 'r'").Scan(&n)
			return n == 0 && checksum(t, spool, "t") == checksum(t, e.pool, "t")
		})

		w := e.startWriter(2, "t", "control", 4000)
		var others atomic.Int64
		var otherErr atomic.Value
		stopOther := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int64(1); ; i++ {
				select {
				case <-stopOther:
					return
				case <-time.After(5 * time.Millisecond):
				}
				if _, err := e.pool.Exec(ctx, "insert into other values ($1::bigint, md5($1::text))", i); err != nil {
					otherErr.Store(err)
					return
				}
				others.Add(1)
			}
		}()

		o := captureOpts(capture, "alter table t alter column id type bigint")
		var hookErr error
		o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
			if point != "before-lock" {
				return nil
			}
			// Marked like a rewrite's transient table while loaded.
			var marked, delta string
			hookErr = e.pool.QueryRow(ctx, `select (s.relrewrite = 't'::regclass)::text || s.relreplident::text,
				(d.relrewrite = 't'::regclass)::text
				from pg_class s, pg_class d where s.oid = 't__tat_new'::regclass and d.oid = 't__tat_delta'::regclass`).Scan(&marked, &delta)
			if hookErr == nil && (marked != "truef" || delta != "true") {
				hookErr = fmt.Errorf("shadow: relrewrite set, replica identity: %s; delta marked: %s", marked, delta)
			}
			return nil
		}
		ev := &events{}
		err := replicate.Run(ctx, e.pool, o, ev, nil)
		if err == nil {
			time.Sleep(500 * time.Millisecond) // writes on the new table
		}
		close(stopOther)
		wg.Wait()
		w.Stop(t)
		if err != nil {
			t.Fatal(err)
		}
		if hookErr != nil {
			t.Fatal(hookErr)
		}
		if oe, _ := otherErr.Load().(error); oe != nil {
			t.Fatal(oe)
		}
		if !ev.has("publication(s) p publish all tables") {
			t.Fatalf("no event about the publication: %v", ev.msgs)
		}
		e.assertSame("t", "control", "id, v, n")
		e.assertNoLeftovers("t")
		if got := e.str(`select relrewrite::text || relreplident::text || format_type(a.atttypid, a.atttypmod)
			from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attname = 'id' where c.oid = 't'::regclass`); got != "0dbigint" {
			t.Fatalf("new table: relrewrite, replica identity, id type: %s", got)
		}

		for _, tb := range []string{"t", "control", "other"} {
			waitFor(t, 60*time.Second, "the subscriber to catch up on "+tb, func() bool {
				return checksum(t, spool, tb) == checksum(t, e.pool, tb)
			})
		}
		if others.Load() == 0 {
			t.Fatal("nothing written to other")
		}
		var pid *int32
		if err := spool.QueryRow(ctx, "select pid from pg_stat_subscription where subname = 's' and relid is null").Scan(&pid); err != nil || pid == nil {
			t.Fatalf("the subscription's apply worker is not running (%v)", err)
		}
		if n := e.str("select count(*) from pg_replication_slots where slot_name = $1 and active", slot); n != "1" {
			t.Fatalf("the subscription's slot is not active")
		}
		if log, err := os.ReadFile(filepath.Join(sub.Dir, "server.log")); err == nil {
			for _, l := range strings.Split(string(log), "\n") {
				if strings.Contains(l, "does not exist") && strings.Contains(l, "logical replication") {
					t.Fatalf("subscriber: %s", l)
				}
			}
		}
	})
}

// Without a publication that publishes every table, the run leaves the
// shadow as it always did: no mark, the original's replica identity.
func TestPublicationNoneLeavesShadowAlone(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 2000)
	e.exec("create publication p_one for table control")
	o := opts("alter table orders alter column n type bigint")
	var got string
	o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
		if point == "before-lock" {
			return e.pool.QueryRow(ctx, `select relrewrite::text || relreplident::text from pg_class where oid = 'orders__tat_new'::regclass`).Scan(&got)
		}
		return nil
	}
	ev := &events{}
	if err := replicate.Run(context.Background(), e.pool, o, ev, nil); err != nil {
		t.Fatal(err)
	}
	if got != "0d" {
		t.Fatalf("shadow: relrewrite, replica identity = %q, want 0d", got)
	}
	if ev.has("publish all tables") {
		t.Fatalf("unexpected publication event: %v", ev.msgs)
	}
	e.assertSame("orders", "control", "id, v, n")
}

func quoteLit(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// A partitioned table under a FOR ALL TABLES publication: every shadow
// partition is marked and has a replica identity during the load; after the
// switch the partitions are unmarked with the original's identities.
func TestPublicationPartitioned(t *testing.T) {
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		e.exec(`create table pt (id int primary key, v text, n int) partition by range (id);
			create table pt_1 partition of pt for values from (minvalue) to (1000);
			create table pt_2 partition of pt for values from (1000) to (maxvalue);
			alter table pt_2 replica identity full;
			create table control (id int primary key, v text, n int);
			insert into pt select g, md5(g::text), g from generate_series(1, 3000) g;
			insert into control select * from pt;
			create publication p for all tables`)
		w := e.startWriter(2, "pt", "control", 4000)
		o := captureOpts(capture, "alter table pt alter column n type bigint")
		var during string
		o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
			if point == "before-lock" {
				return e.pool.QueryRow(ctx, `select string_agg(relname || ':' || (relrewrite = 'pt'::regclass)::text || relreplident::text, ' ' order by relname)
					from pg_class where relname like 'pt%\_\_tat\_new' and relkind = 'r'`).Scan(&during)
			}
			return nil
		}
		err := e.run(o)
		w.Stop(t)
		if err != nil {
			t.Fatal(err)
		}
		if during != "pt_1__tat_new:truef pt_2__tat_new:truef" {
			t.Fatalf("shadow partitions during the load: %s", during)
		}
		if got := e.str(`select string_agg(relname || ':' || relrewrite::text || relreplident::text, ' ' order by relname)
			from pg_class where relname in ('pt', 'pt_1', 'pt_2')`); got != "pt:0d pt_1:0d pt_2:0f" {
			t.Fatalf("after the switch: %s", got)
		}
		e.assertSame("pt", "control", "id, v, n")
		e.assertNoLeftovers("pt")
	})
}
