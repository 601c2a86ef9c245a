package replicate

import "testing"

// The verifier PostgreSQL stores for a password (checked against a
// computation with Python's hashlib; a login with it was checked by hand
// against PostgreSQL 15 over scram-sha-256).
func TestScramVerifier(t *testing.T) {
	salt := make([]byte, 16)
	for i := range salt {
		salt[i] = byte(i)
	}
	got, err := scramVerifierSalt("pencil", salt)
	if err != nil {
		t.Fatal(err)
	}
	const want = "SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$zHCdol2044/ZyWzPLi7oxApCkamKw9Z+E4U/QApd/5Y=:dd5peBOitVnLNFu7VmwP+HiDaaw4OUCv396eVCWhYiE="
	if got != want {
		t.Fatalf("verifier\n got %s\nwant %s", got, want)
	}
}

// inlineArgs never touches a $1 inside a name, a string or a dollar quote,
// and writes values as constants that no setting changes the meaning of.
func TestInlineArgs(t *testing.T) {
	got, err := inlineArgs(`SELECT "a$1", 'b$1', E'c\'$1', $x$ $1 $x$, a$1, $1, $2::text[] FROM t WHERE k = $10`,
		[]any{int64(7), []string{"it's", `back\slash`}, 3, 4, 5, 6, 7, 8, 9, uint32(10)})
	if err != nil {
		t.Fatal(err)
	}
	want := `SELECT "a$1", 'b$1', E'c\'$1', $x$ $1 $x$, a$1, (7), (ARRAY[E'it''s', E'back\\slash']::text[])::text[] FROM t WHERE k = (10)`
	if got != want {
		t.Fatalf("\n got %s\nwant %s", got, want)
	}
}
