package replicate

import (
	"context"
	"sync"
	"time"
)

// steering caches the driver's Steering and applies it at safe points.
type steering struct {
	mu       sync.Mutex
	last     time.Time
	cur      Steering
	batch    int
	lockTO   time.Duration
	between  time.Duration
	throttle string
	paused   bool
}

// hold is the engine's safe point: it applies changed knobs and blocks
// while the driver pauses or throttles the job. It must be called with no
// transaction open.
func (m *migration) hold(ctx context.Context) error {
	st, ok := m.ctl.(Steerer)
	if !ok || m.ctl == nil {
		return nil
	}
	for {
		s, err := m.poll(ctx, st)
		if err != nil {
			return err
		}
		if !s.Paused && s.ThrottleReason == "" {
			m.setHeld(ctx, false, "")
			return nil
		}
		m.setHeld(ctx, s.Paused, s.ThrottleReason)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (m *migration) poll(ctx context.Context, st Steerer) (Steering, error) {
	m.steer.mu.Lock()
	defer m.steer.mu.Unlock()
	if time.Since(m.steer.last) < 500*time.Millisecond {
		return m.steer.cur, nil
	}
	s, err := st.Steer(ctx)
	if err != nil {
		return Steering{}, err
	}
	m.steer.last, m.steer.cur = time.Now(), s
	if s.BatchSize > 0 && s.BatchSize != m.steer.batch {
		m.steer.batch = s.BatchSize
		m.event(ctx, m.currentPhase(), "batch_size set to "+itoa(s.BatchSize))
	}
	if s.LockTimeout > 0 {
		m.steer.lockTO = s.LockTimeout
	}
	if s.BetweenLocks > 0 {
		m.steer.between = s.BetweenLocks
	}
	return s, nil
}

func (m *migration) setHeld(ctx context.Context, paused bool, reason string) {
	m.steer.mu.Lock()
	changed := m.steer.paused != paused || m.steer.throttle != reason
	m.steer.paused, m.steer.throttle = paused, reason
	m.steer.mu.Unlock()
	if changed {
		switch {
		case paused:
			m.event(ctx, m.currentPhase(), "paused")
		case reason != "":
			m.event(ctx, m.currentPhase(), "throttled: "+reason)
		default:
			m.event(ctx, m.currentPhase(), "running")
		}
		m.report(ctx)
	}
}

// batchSize, lockTimeout and timeBetweenLocks are the options as steered.
func (m *migration) batchSize() int {
	m.steer.mu.Lock()
	defer m.steer.mu.Unlock()
	if m.steer.batch > 0 {
		return m.steer.batch
	}
	return m.opts.BatchSize
}

func (m *migration) lockTimeout() time.Duration {
	m.steer.mu.Lock()
	defer m.steer.mu.Unlock()
	if m.steer.lockTO > 0 {
		return m.steer.lockTO
	}
	return m.opts.LockTimeout
}

func (m *migration) timeBetweenLocks() time.Duration {
	m.steer.mu.Lock()
	defer m.steer.mu.Unlock()
	if m.steer.between > 0 {
		return m.steer.between
	}
	return m.opts.TimeBetweenLocks
}

func (m *migration) heldState() (bool, string) {
	m.steer.mu.Lock()
	defer m.steer.mu.Unlock()
	return m.steer.paused, m.steer.throttle
}
