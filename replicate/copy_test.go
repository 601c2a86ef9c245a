package replicate

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestSplitPoints(t *testing.T) {
	hist := []string{"a", "b", "c", "d", "e", "f", "g", "h", "i"} // 8 ranges possible
	cases := []struct {
		vals []string
		n    int
		hist bool
		want []string
	}{
		{hist, 4, true, []string{"c", "e", "g"}},
		{hist, 2, true, []string{"e"}},
		{hist, 8, true, []string{"b", "c", "d", "e", "f", "g", "h"}},
		{hist, 20, true, []string{"b", "c", "d", "e", "f", "g", "h"}}, // fewer bounds than wanted
		{hist, 1, true, nil},
		{[]string{"a", "z"}, 8, true, nil}, // min and max only: one range
		{[]string{"a"}, 8, true, nil},
		{nil, 8, true, nil},
		// Common values: every value but the last may end a range.
		{[]string{"0", "1", "2", "3", "4"}, 8, false, []string{"0", "1", "2", "3"}},
		{[]string{"0", "1", "2", "3", "4"}, 2, false, []string{"1"}},
		{[]string{"0", "1"}, 8, false, []string{"0"}},
		{[]string{"0"}, 8, false, nil},
	}
	for _, c := range cases {
		got := splitPoints(c.vals, c.n, c.hist)
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("splitPoints(%v, %d, %v) = %v, want %v", c.vals, c.n, c.hist, got, c.want)
		}
		for i := 1; i < len(got); i++ {
			if got[i] <= got[i-1] {
				t.Errorf("splitPoints(%v, %d, %v): %v not increasing", c.vals, c.n, c.hist, got)
			}
		}
	}
}

// A split point on the first column of a composite key bounds that column
// only; a checkpoint (the whole key) bounds the whole key.
func TestRangeCondPrefix(t *testing.T) {
	keys, types := []string{`t."a"`, `t."b"`}, []string{"integer", "text"}
	w, args := rangeCond(keys, types, []string{"5"}, []string{"9"})
	if want := ` WHERE (t."a") > ($1::integer) AND (t."a") <= ($2::integer)`; w != want {
		t.Errorf("got %s, want %s", w, want)
	}
	if !reflect.DeepEqual(args, []any{"5", "9"}) {
		t.Errorf("args %v", args)
	}
	w, args = rangeCond(keys, types, []string{"7", "x"}, []string{"9"})
	if want := ` WHERE (t."a", t."b") > ($1::integer, $2::text) AND (t."a") <= ($3::integer)`; w != want {
		t.Errorf("got %s, want %s", w, want)
	}
	if len(args) != 3 {
		t.Errorf("args %v", args)
	}
	if w, _ := rangeCond(keys, types, nil, nil); w != "" {
		t.Errorf("unbounded: %s", w)
	}
	if w, _ := rangeCond(keys, types, nil, []string{"1"}); !strings.HasPrefix(w, ` WHERE (t."a") <=`) {
		t.Errorf("open below: %s", w)
	}
}

// notVisible reads pg_current_snapshot's text and maps pgoutput's 32-bit
// xids into its epoch, also across a wraparound of the 32-bit counter.
func TestNotVisible(t *testing.T) {
	const e1 = uint64(1) << 32 // epoch 1
	cases := []struct {
		snap string
		xids []uint32
		want int
	}{
		{"100:105:101,103", []uint32{99, 100, 102, 104}, 0},
		{"100:105:101,103", []uint32{101}, 1},
		{"100:105:101,103", []uint32{103, 105, 110}, 3}, // in progress, and not ended yet (>= xmax)
		{"100:100:", []uint32{99, 100}, 1},
		// xmax just past a wraparound: 4294967290 is from epoch 0, seen.
		{fmt.Sprintf("%d:%d:", e1+2, e1+5), []uint32{4294967290, 3}, 0},
		{fmt.Sprintf("%d:%d:%d", e1-6, e1+5, e1-6), []uint32{4294967290}, 1},
		{fmt.Sprintf("%d:%d:", e1-6, e1-6), []uint32{2}, 1}, // epoch 1, not ended yet
	}
	for _, c := range cases {
		got, err := notVisible(c.snap, c.xids)
		if err != nil || got != c.want {
			t.Errorf("notVisible(%q, %v) = %d, %v; want %d", c.snap, c.xids, got, err, c.want)
		}
	}
	if _, err := notVisible("garbage", nil); err == nil {
		t.Error("no error for a malformed snapshot")
	}
}
