package replicate

import "testing"

func TestHasUniqueBesidesKey(t *testing.T) {
	p := &plan{Indexes: []shadowIndex{{IsKeyIndex: true, CreateSQL: "CREATE UNIQUE INDEX a ON t (id)"}, {CreateSQL: "CREATE INDEX b ON t (v)"}}}
	if p.hasUniqueBesidesKey() {
		t.Fatal("only the key is unique")
	}
	p.Indexes = append(p.Indexes, shadowIndex{CreateSQL: "CREATE UNIQUE INDEX c ON t (v)"})
	if !p.hasUniqueBesidesKey() {
		t.Fatal("c is unique")
	}
}
