package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"unicode/utf8"
)

// formatValue prints a measured value with about three significant digits
// and no exponent for the ranges the harness produces.
func formatValue(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return fmt.Sprint(v)
	case a == 0:
		return "0"
	case v == math.Trunc(v) && a < 1e9:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 0.01:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

// formatMetrics joins a result's metrics as "12.3 ns/chain, 81.3 Mpps".
func formatMetrics(ms []Metric) string {
	parts := make([]string, 0, len(ms))
	for _, m := range ms {
		s := formatValue(m.Value)
		switch m.Unit {
		case "":
		case "x":
			s += "x"
		default:
			s += " " + m.Unit
		}
		if m.N > 1 {
			s += " [" + formatValue(m.Min) + "–" + formatValue(m.Max) + "]"
		}
		if m.Name != "" && m.Name != m.Unit && !isDefaultMetricName(m.Name) {
			s = m.Name + " " + s
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

// isDefaultMetricName reports whether a metric name is implied by its unit
// and need not be printed in the table.
func isDefaultMetricName(name string) bool {
	switch name {
	case "ns_per_chain", "ns_per_op", "mpps", "mops", "gbps", "ratio", "ms", "cpu":
		return true
	}
	return false
}

// tableRows turns results into rows of (suite, case, result).
func tableRows(results []Result) [][3]string {
	rows := make([][3]string, 0, len(results))
	for _, r := range results {
		val := formatMetrics(r.Metrics)
		if r.Skipped {
			val = "skipped: " + r.Reason
		} else if r.Note != "" {
			val += "  (" + r.Note + ")"
		}
		rows = append(rows, [3]string{r.Suite, r.Name, val})
	}
	return rows
}

// WriteTable writes results as an aligned plain-text table.
func WriteTable(w io.Writer, results []Result) error {
	head := [3]string{"SUITE", "CASE", "RESULT"}
	rows := tableRows(results)
	width := [2]int{utf8.RuneCountInString(head[0]), utf8.RuneCountInString(head[1])}
	for _, r := range rows {
		for i := 0; i < 2; i++ {
			if n := utf8.RuneCountInString(r[i]); n > width[i] {
				width[i] = n
			}
		}
	}
	line := func(c [3]string) string {
		return fmt.Sprintf("%-*s  %-*s  %s", width[0], c[0], width[1], c[1], c[2])
	}
	var b strings.Builder
	b.WriteString(line(head) + "\n")
	b.WriteString(strings.Repeat("-", width[0]) + "  " + strings.Repeat("-", width[1]) + "  " + strings.Repeat("-", 6) + "\n")
	prev := ""
	for _, r := range rows {
		if prev != "" && r[0] != prev {
			b.WriteString("\n")
		}
		prev = r[0]
		b.WriteString(strings.TrimRight(line(r), " ") + "\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteMarkdown writes results as a GitHub-flavoured Markdown table.
func WriteMarkdown(w io.Writer, results []Result) error {
	var b strings.Builder
	b.WriteString("| suite | case | result |\n|---|---|---|\n")
	esc := func(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
	for _, r := range tableRows(results) {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", esc(r[0]), esc(r[1]), esc(r[2]))
	}
	_, err := io.WriteString(w, b.String())
	return err
}
