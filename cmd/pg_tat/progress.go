package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/replicate"
)

// progress prints the engine's progress: a bar redrawn in place on a
// terminal, plain lines (at most one every 5 s, plus events) otherwise.
type progress struct {
	mu       sync.Mutex
	out      io.Writer
	tty      bool
	start    time.Time
	last     time.Time
	lastRows int64
	lastAt   time.Time
	rate     float64
	drawn    bool
	every    time.Duration // a line this often when not on a terminal (--copy-progress-interval)
}

func newProgress(out io.Writer) *progress {
	tty := false
	if f, ok := out.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return &progress{out: out, tty: tty, start: time.Now(), every: 5 * time.Second}
}

func (p *progress) Event(_ context.Context, phase, msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clearLine()
	fmt.Fprintf(p.out, "%s [%s] %s\n", time.Now().Format("15:04:05"), phase, msg)
}

func (p *progress) Progress(_ context.Context, pr replicate.Progress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if !p.lastAt.IsZero() && now.Sub(p.lastAt) > 500*time.Millisecond {
		inst := float64(pr.RowsCopied-p.lastRows) / now.Sub(p.lastAt).Seconds()
		p.rate = 0.7*p.rate + 0.3*inst
	}
	p.lastRows, p.lastAt = pr.RowsCopied, now
	pct := 0.0
	if pr.RowsTotal > 0 {
		pct = 100 * float64(pr.RowsCopied) / float64(pr.RowsTotal)
	}
	eta := "-"
	if p.rate > 0 && pr.RowsTotal > pr.RowsCopied && pr.Phase == replicate.PhaseCopy {
		eta = (time.Duration(float64(pr.RowsTotal-pr.RowsCopied)/p.rate) * time.Second).Round(time.Second).String()
	}
	line := fmt.Sprintf("%-8s %6.1f%% %d/%d rows %.0f rows/s eta %s backlog %d locks %d",
		pr.Phase, pct, pr.RowsCopied, pr.RowsTotal, p.rate, eta, pr.DeltaBacklog, pr.LockAttempts)
	if p.tty {
		const width = 30
		n := int(pct / 100 * width)
		n = min(max(n, 0), width)
		fmt.Fprintf(p.out, "\r[%s%s] %s\x1b[K", strings.Repeat("#", n), strings.Repeat(".", width-n), line)
		p.drawn = true
		return
	}
	if now.Sub(p.last) >= p.every {
		p.last = now
		fmt.Fprintln(p.out, line)
	}
}

func (p *progress) clearLine() {
	if p.tty && p.drawn {
		fmt.Fprint(p.out, "\r\x1b[K")
		p.drawn = false
	}
}

func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clearLine()
	fmt.Fprintf(p.out, "finished in %s\n", time.Since(p.start).Round(time.Millisecond))
}

func quoteRel(schema, name string) string {
	if schema == "" {
		return pgx.Identifier{name}.Sanitize()
	}
	return pgx.Identifier{schema, name}.Sanitize()
}
