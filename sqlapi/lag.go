package sqlapi

import (
	"sort"
	"time"
)

// lagTracker turns the WAL logical capture has not consumed yet (bytes) into
// time, like the write/flush/replay lag of pg_stat_replication: it remembers
// when the server's WAL end passed each position (one sample per progress
// write, at most one a second) and answers how long ago the WAL at the
// consumed position (WAL end - bytes behind) was written, interpolating
// between the two samples around it. Precision is about the sample interval.
// Before the consumed position passes the oldest sample, the answer is a
// lower bound (the time since that sample), so a stuck stream shows a
// growing lag.
type lagTracker struct {
	samples []lsnSample
}

type lsnSample struct {
	at  time.Time
	lsn uint64
}

// maxLagSamples bounds the memory: an hour of samples at one a second (the
// oldest are dropped first, which only coarsens the lower bound).
const maxLagSamples = 3600

// observe records that the WAL ended at end at time now, with behind bytes
// not consumed yet, and returns the capture lag.
func (t *lagTracker) observe(now time.Time, end uint64, behind int64) time.Duration {
	if n := len(t.samples); n == 0 || end > t.samples[n-1].lsn {
		t.samples = append(t.samples, lsnSample{at: now, lsn: end})
	}
	if len(t.samples) > maxLagSamples {
		t.samples = t.samples[len(t.samples)-maxLagSamples:]
	}
	if behind <= 0 {
		t.samples = t.samples[len(t.samples)-1:]
		return 0
	}
	consumed := uint64(0)
	if uint64(behind) < end {
		consumed = end - uint64(behind)
	}
	// first sample past the consumed position: the WAL there was written
	// after samples[i-1].at and no later than samples[i].at
	i := sort.Search(len(t.samples), func(i int) bool { return t.samples[i].lsn > consumed })
	if i == 0 {
		return max(now.Sub(t.samples[0].at), 0)
	}
	if i == len(t.samples) { // not behind after all
		return 0
	}
	prev, next := t.samples[i-1], t.samples[i]
	t.samples = t.samples[i-1:] // the consumed position only moves forward
	frac := float64(consumed-prev.lsn) / float64(next.lsn-prev.lsn)
	written := prev.at.Add(time.Duration(frac * float64(next.at.Sub(prev.at))))
	return max(now.Sub(written), 0)
}
