// Package bench holds pg_tat's benchmark suite (make bench). Everything is
// in the _test.go files: `go test ./...` compiles it and runs nothing; with
// -bench it starts a throwaway PostgreSQL cluster, measures the online
// rewrite against a plain blocking ALTER TABLE on identical tables in the
// same run, and writes results/REPORT.md, results/results.jsonl and the
// writer charts (results/*.svg).
package bench
