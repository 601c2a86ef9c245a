package bench

import (
	"bufio"
	"context"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pgtat/pg_tat/replicate"
)

// result is one scenario: one JSON line in results.jsonl.
type result struct {
	Scenario string `json:"scenario"`
	Kind     string `json:"kind"` // rewrite | writer | repack | verify
	Rows     int64  `json:"rows"`
	Method   string `json:"method"` // blocking | floor | trigger | logical | pg_repack
	CopyJobs int    `json:"copy_data_jobs,omitempty"`
	Verify   *bool  `json:"verify,omitempty"` // set: the run's Options.Verify (verify scenarios); nil: the default
	Rep      int    `json:"rep,omitempty"`
	Status   string `json:"status"` // ok | n/a | error | skipped
	Note     string `json:"note,omitempty"`

	Seconds      float64            `json:"seconds"`
	Ratio        float64            `json:"ratio_vs_blocking,omitempty"`
	RatioFloor   float64            `json:"ratio_vs_floor,omitempty"`
	Phases       map[string]float64 `json:"phase_seconds,omitempty"`
	LockWindowMS float64            `json:"lock_window_ms,omitempty"`
	LockAttempts int                `json:"lock_attempts,omitempty"`
	MaxBacklog   int64              `json:"max_delta_backlog,omitempty"`
	// logical capture: WAL not yet consumed by the stream (Progress.LagBytes)
	MaxLagBytes    int64 `json:"max_lag_bytes,omitempty"`
	SwitchLagBytes int64 `json:"lag_bytes_at_switch,omitempty"`
	// the server's view when the switch phase began: pg_current_wal_lsn()
	// minus the slot's confirmed_flush_lsn / the walsender's sent_lsn
	SlotLagAtSwitch int64 `json:"slot_lag_bytes_at_switch,omitempty"`
	SentLagAtSwitch int64 `json:"walsender_unsent_bytes_at_switch,omitempty"`

	WALBytes       int64   `json:"wal_bytes"`
	OrigBytes      int64   `json:"orig_total_bytes,omitempty"`
	ShadowCopied   int64   `json:"shadow_bytes_after_copy,omitempty"`
	ShadowPeak     int64   `json:"shadow_bytes_before_switch,omitempty"`
	DeltaPeak      int64   `json:"delta_bytes_before_switch,omitempty"`
	PeakHeapMB     float64 `json:"peak_heap_inuse_mb,omitempty"`
	PeakRSSMB      float64 `json:"peak_rss_mb,omitempty"`
	GoCPUSeconds   float64 `json:"go_process_cpu_seconds,omitempty"`
	HostCPUBusyPct float64 `json:"host_cpu_busy_pct,omitempty"`
	// PGCPUSeconds: CPU of this benchmark's PostgreSQL during the run;
	// OtherCPUSeconds: host busy CPU not used by it nor by this process —
	// other programs on the machine (interference).
	PGCPUSeconds    float64 `json:"pg_cpu_seconds,omitempty"`
	OtherCPUSeconds float64 `json:"other_cpu_seconds"`
	LoadAvg1        float64 `json:"loadavg_1min_at_end,omitempty"`

	Writer *writerStats `json:"writer,omitempty"`
	Bulk   *bulkStats   `json:"bulk,omitempty"`

	// LockBreakdown: the statements the engine ran while holding the
	// cut-over lock (from LOCK TABLE to the "table swapped" event), with
	// the time until the next statement, from Options.ShowQueries.
	LockBreakdown []stmtTime `json:"lock_breakdown,omitempty"`
	SyncMS        float64    `json:"logical_sync_ms,omitempty"`
	// ServerLock: the same from the server log (log_min_duration_statement
	// on the engine's sessions): server time per statement of the cut-over
	// transaction after LOCK TABLE, summed; ServerLockMS is the total.
	ServerLock   []stmtTime `json:"lock_breakdown_server,omitempty"`
	ServerLockMS float64    `json:"lock_server_ms,omitempty"` // "stream consumed up to the cut-over marker in ..."

	Events []event `json:"-"`
	start  time.Time

	// writer scenarios: every transaction and the windows, for the chart
	samples                  []sample
	t0, migStart, migEnd, t1 time.Time
}

type stmtTime struct {
	SQL string  `json:"sql"`
	MS  float64 `json:"ms"`
}

type query struct {
	at  time.Time
	sql string
}

// tracer records the engine's statements (Options.ShowQueries).
type tracer struct {
	mu sync.Mutex
	qs []query
}

func (t *tracer) show(sql string) {
	t.mu.Lock()
	t.qs = append(t.qs, query{time.Now(), sql})
	t.mu.Unlock()
}

// lockBreakdown lists what ran under the cut-over lock of the successful
// attempt, sorted by time spent, longest first.
func (t *tracer) lockBreakdown(ev []event) []stmtTime {
	t.mu.Lock()
	defer t.mu.Unlock()
	var swapped time.Time
	for _, e := range ev {
		if strings.HasPrefix(e.Msg, "table swapped") {
			swapped = e.At
		}
	}
	if swapped.IsZero() {
		return nil
	}
	lock := -1
	for i, q := range t.qs {
		if q.at.After(swapped) {
			break
		}
		if strings.HasPrefix(q.sql, "LOCK TABLE") {
			lock = i
		}
	}
	if lock < 0 {
		return nil
	}
	var out []stmtTime
	for i := lock; i < len(t.qs) && !t.qs[i].at.After(swapped); i++ {
		next := swapped
		if i+1 < len(t.qs) && t.qs[i+1].at.Before(swapped) {
			next = t.qs[i+1].at
		}
		sql := strings.Join(strings.Fields(t.qs[i].sql), " ")
		if len(sql) > 90 {
			sql = sql[:90] + "…"
		}
		out = append(out, stmtTime{SQL: sql, MS: float64(next.Sub(t.qs[i].at).Microseconds()) / 1000})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].MS > out[j].MS })
	return out
}

type event struct {
	At    time.Time
	Phase string
	Msg   string
}

// recorder is the engine's Reporter: it keeps events with their times and
// measures the shadow's size at the phase boundaries.
type recorder struct {
	mu        sync.Mutex
	events    []event
	backlog   int64
	lag       int64 // max LagBytes seen
	switchLag int64 // LagBytes reported when the switch phase began
	inSwitch  bool
	onPhase   func(phase string)
}

func (r *recorder) Progress(_ context.Context, p replicate.Progress) {
	r.mu.Lock()
	if p.DeltaBacklog > r.backlog {
		r.backlog = p.DeltaBacklog
	}
	r.lag = max(r.lag, p.LagBytes)
	if p.Phase == replicate.PhaseSwitch && !r.inSwitch {
		r.inSwitch, r.switchLag = true, p.LagBytes
	}
	r.mu.Unlock()
}

func (r *recorder) Event(_ context.Context, phase, msg string) {
	r.mu.Lock()
	r.events = append(r.events, event{At: time.Now(), Phase: phase, Msg: msg})
	f := r.onPhase
	r.mu.Unlock()
	if f != nil && strings.HasPrefix(msg, "phase ") {
		f(strings.TrimPrefix(msg, "phase "))
	}
}

// digest fills phase durations, the lock window and attempts from events.
func (r *recorder) digest(res *result, end time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	res.Events = append([]event(nil), r.events...)
	res.MaxBacklog = r.backlog
	res.MaxLagBytes, res.SwitchLagBytes = r.lag, r.switchLag
	res.Phases = map[string]float64{}
	var cur string
	var at time.Time
	for _, e := range r.events {
		if strings.HasPrefix(e.Msg, "phase ") {
			if cur != "" {
				res.Phases[cur] += e.At.Sub(at).Seconds()
			}
			cur, at = strings.TrimPrefix(e.Msg, "phase "), e.At
		}
		if rest, ok := strings.CutPrefix(e.Msg, "table swapped; lock held "); ok {
			if d, err := time.ParseDuration(strings.TrimSpace(rest)); err == nil {
				res.LockWindowMS = float64(d.Microseconds()) / 1000
			}
		}
		if strings.HasPrefix(e.Msg, "lock attempt ") {
			res.LockAttempts++
		}
		if rest, ok := strings.CutPrefix(e.Msg, "stream consumed up to the cut-over marker in "); ok {
			if d, err := time.ParseDuration(strings.TrimSpace(rest)); err == nil {
				res.SyncMS = float64(d.Microseconds()) / 1000
			}
		}
	}
	if cur != "" {
		res.Phases[cur] += end.Sub(at).Seconds()
	}
}

// sampler records the peak Go heap in use while a migration runs, and the
// process peak RSS (VmHWM, reset at start where the kernel allows it).
type sampler struct {
	stop     chan struct{}
	done     chan struct{}
	peakHeap uint64
	ru0      syscall.Rusage
	cpu0     cpuTimes
	pg0      float64
}

func startSampler() *sampler {
	_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) // reset VmHWM
	runtime.GC()
	s := &sampler{stop: make(chan struct{}), done: make(chan struct{})}
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &s.ru0)
	s.cpu0 = readCPU()
	s.pg0 = clusterCPU()
	go func() {
		defer close(s.done)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > s.peakHeap {
				s.peakHeap = ms.HeapInuse
			}
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *sampler) finish(r *result) {
	close(s.stop)
	<-s.done
	r.PeakHeapMB = float64(s.peakHeap) / (1 << 20)
	r.PeakRSSMB = float64(procStatusKB("VmHWM")) / 1024
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	r.GoCPUSeconds = tv(ru.Utime) + tv(ru.Stime) - tv(s.ru0.Utime) - tv(s.ru0.Stime)
	cpu1 := readCPU()
	r.HostCPUBusyPct = busyPct(s.cpu0, cpu1)
	if cluster != nil {
		r.PGCPUSeconds = clusterCPU() - s.pg0
		r.OtherCPUSeconds = max(0, hostBusySeconds(s.cpu0, cpu1)-r.PGCPUSeconds-r.GoCPUSeconds)
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		r.LoadAvg1, _ = strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	}
}

func procStatusKB(key string) int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			v, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return v
		}
	}
	return 0
}

type cpuTimes struct{ idle, total uint64 }

// readCPU reads the host's aggregate CPU line of /proc/stat.
func readCPU() cpuTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var c cpuTimes
	for i, v := range f[1:] {
		n, _ := strconv.ParseUint(v, 10, 64)
		if i < 8 { // user nice system idle iowait irq softirq steal
			c.total += n
		}
		if i == 3 || i == 4 {
			c.idle += n
		}
	}
	return c
}

func busyPct(a, b cpuTimes) float64 {
	dt := float64(b.total - a.total)
	if dt <= 0 {
		return 0
	}
	return 100 * (1 - float64(b.idle-a.idle)/dt)
}

// clusterCPU is the CPU time (seconds) used so far by the benchmark's own
// PostgreSQL: the postmaster, its live children and (through cutime and
// cstime) the children it has reaped. With the Go process's own CPU it
// separates this benchmark's load from other processes on the machine.
func clusterCPU() float64 {
	if cluster == nil {
		return 0
	}
	b, err := os.ReadFile(cluster.Dir + "/data/postmaster.pid")
	if err != nil {
		return 0
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pm, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		return 0
	}
	total := procCPU(pm, true)
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == pm {
			continue
		}
		if ppid, ok := procPPID(pid); ok && ppid == pm {
			total += procCPU(pid, false)
		}
	}
	return total
}

func procStatFields(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(s[i+1:]) // fields from 3 (state) on
}

func procPPID(pid int) (int, bool) {
	f := procStatFields(pid)
	if len(f) < 2 {
		return 0, false
	}
	v, err := strconv.Atoi(f[1])
	return v, err == nil
}

// procCPU is utime+stime (+cutime+cstime) of pid in seconds (USER_HZ 100).
func procCPU(pid int, children bool) float64 {
	f := procStatFields(pid)
	if len(f) < 15 {
		return 0
	}
	n := 0.0
	idx := []int{11, 12} // utime, stime (fields 14, 15)
	if children {
		idx = append(idx, 13, 14)
	}
	for _, i := range idx {
		v, _ := strconv.ParseFloat(f[i], 64)
		n += v
	}
	return n / 100
}

// hostBusySeconds is the busy CPU time of the whole host between a and b.
func hostBusySeconds(a, b cpuTimes) float64 {
	return float64((b.total-a.total)-(b.idle-a.idle)) / 100
}
