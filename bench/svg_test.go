package bench

import (
	"fmt"
	"html"
	"math"
	"sort"
	"strings"
	"time"
)

var phaseColor = map[string]string{
	"prepare":  "#e0e0e0",
	"capture":  "#d0c0f0",
	"copy":     "#cfe3ff",
	"index":    "#ffe3b3",
	"analyze":  "#e8f5c8",
	"catchup":  "#ffd0d0",
	"switch":   "#ff8a8a",
	"validate": "#d8f0f0",
	"blocking": "#ffb0b0",
}

// writerSVG draws writer TPS (top) and transaction latency (bottom, log
// scale) over time for one writer scenario, the migration's phases shaded.
func writerSVG(r *result) string {
	const (
		W, H           = 1000, 560
		left, right    = 70, 20
		top1, h1       = 50, 200
		top2, h2       = 300, 200
		bucket         = 250 * time.Millisecond
		latMin, latMax = 0.1, 30000.0 // ms, log axis
	)
	t0, t1 := r.t0, r.t1
	span := t1.Sub(t0).Seconds()
	x := func(t time.Time) float64 { return left + (W-left-right)*t.Sub(t0).Seconds()/span }
	nb := int(math.Ceil(t1.Sub(t0).Seconds() / bucket.Seconds()))
	cnt := make([]int, nb)
	maxLat := make([]float64, nb)
	lats := make([][]float64, nb)
	for _, s := range r.samples {
		if s.end.Before(t0) || !s.end.Before(t1) {
			continue
		}
		i := int(s.end.Sub(t0) / bucket)
		if s.ok {
			cnt[i]++
		}
		l := ms(s.end.Sub(s.start))
		lats[i] = append(lats[i], l)
		maxLat[i] = max(maxLat[i], l)
	}
	maxTPS := 1.0
	for _, c := range cnt {
		maxTPS = max(maxTPS, float64(c)/bucket.Seconds())
	}
	maxTPS = niceCeil(maxTPS * 1.1)
	yT := func(v float64) float64 { return top1 + h1 - h1*v/maxTPS }
	yL := func(v float64) float64 {
		v = min(max(v, latMin), latMax)
		return top2 + h2 - h2*(math.Log10(v)-math.Log10(latMin))/(math.Log10(latMax)-math.Log10(latMin))
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", W, H)
	title := fmt.Sprintf("%s — writer %d clients, %s; ALTER TABLE t ALTER COLUMN aid TYPE bigint", r.Scenario, r.Writer.Clients, rateLabel(r.Writer.TargetTPS))
	fmt.Fprintf(&b, `<text x="%d" y="20" font-size="14" font-weight="bold">%s</text>`+"\n", left, html.EscapeString(title))

	// phases
	ph := phaseSpans(r, r.migEnd)
	seen := map[string]bool{}
	var legend []string
	for _, p := range ph {
		col := phaseColor[p.name]
		if col == "" {
			col = "#eeeeee"
		}
		xa, xb := x(p.a), x(p.b)
		w := max(xb-xa, 1.5)
		for _, pan := range [][2]float64{{top1, h1}, {top2, h2}} {
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.0f" width="%.1f" height="%.0f" fill="%s" opacity="0.8"/>`+"\n", xa, pan[0], w, pan[1], col)
		}
		if xb-xa > 45 {
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%s</text>`+"\n", (xa+xb)/2, top1+14, p.name)
		}
		if !seen[p.name] {
			seen[p.name] = true
			legend = append(legend, p.name)
		}
	}
	// axes and grid
	for _, pan := range [][2]float64{{top1, h1}, {top2, h2}} {
		fmt.Fprintf(&b, `<rect x="%d" y="%.0f" width="%d" height="%.0f" fill="none" stroke="#888"/>`+"\n", left, pan[0], W-left-right, pan[1])
	}
	for i := 0; i <= 4; i++ {
		v := maxTPS * float64(i) / 4
		y := yT(v)
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ccc" stroke-dasharray="2,3"/>`, left, W-right, y, y)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%.0f</text>`+"\n", left-5, y+4, v)
	}
	fmt.Fprintf(&b, `<text x="15" y="%d" transform="rotate(-90 15 %d)" text-anchor="middle">writer TPS (per %s)</text>`+"\n", top1+h1/2, top1+h1/2, bucket)
	for v := latMin; v <= latMax*1.01; v *= 10 {
		y := yL(v)
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ccc" stroke-dasharray="2,3"/>`, left, W-right, y, y)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", left-5, y+4, latLabel(v))
	}
	fmt.Fprintf(&b, `<text x="15" y="%d" transform="rotate(-90 15 %d)" text-anchor="middle">latency (log)</text>`+"\n", top2+h2/2, top2+h2/2)
	// time ticks: seconds relative to the migration start
	step := niceStep(span / 10)
	for s := math.Ceil(t0.Sub(r.migStart).Seconds()/step) * step; s <= t1.Sub(r.migStart).Seconds(); s += step {
		xx := x(r.migStart.Add(time.Duration(s * float64(time.Second))))
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#888"/>`, xx, xx, top2+h2, top2+h2+4)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%g</text>`+"\n", xx, top2+h2+16, s)
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">seconds since the migration started</text>`+"\n", left+(W-left-right)/2, top2+h2+32)

	// series
	var tpsPts, maxPts, p99Pts []string
	for i := 0; i < nb; i++ {
		xa := x(t0.Add(time.Duration(i) * bucket))
		xb := x(t0.Add(time.Duration(i+1) * bucket))
		tpsPts = append(tpsPts, fmt.Sprintf("%.1f,%.1f %.1f,%.1f", xa, yT(float64(cnt[i])/bucket.Seconds()), xb, yT(float64(cnt[i])/bucket.Seconds())))
		if len(lats[i]) > 0 {
			sort.Float64s(lats[i])
			p := lats[i][max(0, int(math.Ceil(0.99*float64(len(lats[i]))))-1)]
			xm := (xa + xb) / 2
			maxPts = append(maxPts, fmt.Sprintf("%.1f,%.1f", xm, yL(maxLat[i])))
			p99Pts = append(p99Pts, fmt.Sprintf("%.1f,%.1f", xm, yL(p)))
		}
	}
	fmt.Fprintf(&b, `<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="%s"/>`+"\n", strings.Join(tpsPts, " "))
	fmt.Fprintf(&b, `<polyline fill="none" stroke="#2a9d4a" stroke-width="1.2" points="%s"/>`+"\n", strings.Join(p99Pts, " "))
	fmt.Fprintf(&b, `<polyline fill="none" stroke="#c0392b" stroke-width="1.2" points="%s"/>`+"\n", strings.Join(maxPts, " "))
	// swap marker
	for _, e := range r.Events {
		if strings.HasPrefix(e.Msg, "table swapped") {
			xx := x(e.At)
			fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="black" stroke-dasharray="4,2"/>`, xx, xx, top1, top2+h2)
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="end" font-size="11">%s</text>`+"\n", xx-3, top2+12, html.EscapeString(e.Msg))
		}
	}
	// legend
	lx := float64(left)
	ly := float64(top1 - 12)
	item := func(col, label string, line bool) {
		if line {
			fmt.Fprintf(&b, `<line x1="%.0f" x2="%.0f" y1="%.0f" y2="%.0f" stroke="%s" stroke-width="2"/>`, lx, lx+16, ly-4, ly-4, col)
		} else {
			fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="16" height="10" fill="%s"/>`, lx, ly-9, col)
		}
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f">%s</text>`+"\n", lx+20, ly, html.EscapeString(label))
		lx += 28 + 7*float64(len(label))
	}
	item("#1f5fbf", "TPS", true)
	item("#2a9d4a", "p99 latency", true)
	item("#c0392b", "max latency", true)
	for _, p := range legend {
		item(phaseColor[p], p, false)
	}
	ws := r.Writer
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="11" fill="#333">TPS before %.0f / during %.0f (%.0f%%) / after %.0f; during: p99 %.1f ms, max %.1f ms, longest gap %.1f ms; lock window %.1f ms; %d errors</text>`+"\n",
		left, H-8, ws.TPSBefore, ws.TPSDuring, ws.DuringPct, ws.TPSAfter, ws.P99MS, ws.MaxMS, ws.MaxGapMS, r.LockWindowMS, ws.Errors)
	b.WriteString("</svg>\n")
	return b.String()
}

func rateLabel(r int) string {
	if r == 0 {
		return "flat out"
	}
	return fmt.Sprintf("%d TPS target", r)
}

func latLabel(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%gs", v/1000)
	}
	return fmt.Sprintf("%gms", v)
}

func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func niceStep(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}
