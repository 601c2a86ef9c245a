package sqlapi

import (
	"errors"
	"fmt"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"

	"github.com/pgtat/pg_tat/replicate"
)

// ErrInvalidCommand is wrapped by every refusal of ValidateCommand.
var ErrInvalidCommand = errors.New("invalid command")

// ValidateCommand checks with the PostgreSQL parser that cmd is exactly one
// statement pg_tat runs: an ALTER TABLE (AlterTableStmt on a table), a
// RENAME COLUMN of a table, or pg_tat's own
// "ALTER TABLE [IF EXISTS] [ONLY] name MOVE COLUMN a BEFORE b", which the
// PostgreSQL grammar does not know and is therefore checked token by token.
// tat.alter already refused most bad commands; this is the sidecar's second
// line of defence before anything runs with its privileges.
func ValidateCommand(cmd string) error {
	if strings.TrimSpace(strings.Trim(strings.TrimSpace(cmd), ";")) == "" {
		return fmt.Errorf("%w: empty command", ErrInvalidCommand)
	}
	tree, perr := pg_query.Parse(cmd)
	if perr != nil {
		if isMoveColumn(cmd) {
			return nil
		}
		return fmt.Errorf("%w: %v", ErrInvalidCommand, perr)
	}
	if n := len(tree.GetStmts()); n > 1 {
		// Several ALTER TABLE statements of one table are applied together.
		stmts, err := replicate.SplitStatements(cmd)
		if err == nil {
			_, err = replicate.CombineCommands(stmts)
		}
		if err != nil {
			return fmt.Errorf("%w: want exactly one statement, or several ALTER TABLE statements of one table: %v", ErrInvalidCommand, err)
		}
		return nil
	} else if n != 1 {
		return fmt.Errorf("%w: want exactly one statement, got %d", ErrInvalidCommand, n)
	}
	stmt := tree.GetStmts()[0].GetStmt()
	if at := stmt.GetAlterTableStmt(); at != nil {
		if at.GetObjtype() != pg_query.ObjectType_OBJECT_TABLE {
			return fmt.Errorf("%w: ALTER %s is not supported, only ALTER TABLE", ErrInvalidCommand,
				strings.TrimPrefix(at.GetObjtype().String(), "OBJECT_"))
		}
		if len(at.GetCmds()) == 0 {
			return fmt.Errorf("%w: ALTER TABLE without an action", ErrInvalidCommand)
		}
		return nil
	}
	if rn := stmt.GetRenameStmt(); rn != nil {
		if rn.GetRenameType() == pg_query.ObjectType_OBJECT_COLUMN && rn.GetRelationType() == pg_query.ObjectType_OBJECT_TABLE {
			return nil
		}
		return fmt.Errorf("%w: only RENAME COLUMN is supported among ALTER TABLE ... RENAME forms", ErrInvalidCommand)
	}
	return fmt.Errorf("%w: not an ALTER TABLE statement", ErrInvalidCommand)
}

// isMoveColumn accepts
//
//	ALTER TABLE [IF EXISTS] [ONLY] name[.name] MOVE COLUMN col BEFORE col [;]
func isMoveColumn(cmd string) bool {
	res, err := pg_query.Scan(cmd)
	if err != nil {
		return false
	}
	var toks []pg_query.Token
	var kinds []pg_query.KeywordKind
	for _, t := range res.GetTokens() {
		switch t.GetToken() {
		case pg_query.Token_SQL_COMMENT, pg_query.Token_C_COMMENT:
			continue
		}
		toks = append(toks, t.GetToken())
		kinds = append(kinds, t.GetKeywordKind())
	}
	for len(toks) > 0 && toks[len(toks)-1] == pg_query.Token_ASCII_59 {
		toks, kinds = toks[:len(toks)-1], kinds[:len(kinds)-1]
	}
	i := 0
	eat := func(want pg_query.Token) bool {
		if i < len(toks) && toks[i] == want {
			i++
			return true
		}
		return false
	}
	name := func() bool {
		if i < len(toks) && (toks[i] == pg_query.Token_IDENT ||
			(kinds[i] != pg_query.KeywordKind_NO_KEYWORD && kinds[i] != pg_query.KeywordKind_RESERVED_KEYWORD)) {
			i++
			return true
		}
		return false
	}
	if !eat(pg_query.Token_ALTER) || !eat(pg_query.Token_TABLE) {
		return false
	}
	if eat(pg_query.Token_IF_P) && !eat(pg_query.Token_EXISTS) {
		return false
	}
	eat(pg_query.Token_ONLY)
	if !name() {
		return false
	}
	for eat(pg_query.Token_ASCII_46) {
		if !name() {
			return false
		}
	}
	return eat(pg_query.Token_MOVE) && eat(pg_query.Token_COLUMN) && name() &&
		eat(pg_query.Token_BEFORE) && name() && i == len(toks)
}
