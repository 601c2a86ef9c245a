// Package pgtat holds what the binaries share that is not Go: the SQL schema.
package pgtat

import _ "embed"

// InstallSQL creates or upgrades schema tat; it is idempotent.
//
//go:embed install.sql
var InstallSQL string
