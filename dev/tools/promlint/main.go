// promlint checks Prometheus text expositions against the naming rules `promtool check metrics`
// applies (it runs the same linter, client_golang's promlint), plus rolemesh's own: every family
// is rolemesh_-prefixed and a point in time is a gauge named *_timestamp_seconds.
//
// The expositions are OpenMetrics (what prometheus-client writes); promlint reads the Prometheus
// text format, so each is first put in that format as Prometheus itself ingests it: a counter
// family takes its _total name, an info family becomes a gauge named *_info, and # UNIT and # EOF
// go.
//
// Usage: promlint NAME=FILE... (NAME labels the findings, e.g. controller=controller.prom).
// Exits 1 when any exposition has a finding, 2 when an argument cannot be read or parsed.
package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/prometheus/common/expfmt"
)

// Words that name a point in time; such a metric must say so with _timestamp_seconds.
var timeWords = []string{"not_after", "not_before", "expiry", "expiration", "deadline", "last_"}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: promlint NAME=FILE...")
		os.Exit(2)
	}
	findings := 0
	for _, arg := range os.Args[1:] {
		name, path, ok := strings.Cut(arg, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "promlint: %q is not NAME=FILE\n", arg)
			os.Exit(2)
		}
		text, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "promlint: %s: %v\n", name, err)
			os.Exit(2)
		}
		text = fromOpenMetrics(text)
		problems, err := promlint.New(bytes.NewReader(text)).Lint()
		if err != nil {
			fmt.Fprintf(os.Stderr, "promlint: %s: the exposition does not parse: %v\n", name, err)
			os.Exit(2)
		}
		for _, p := range problems {
			fmt.Printf("%s: %s: %s\n", name, p.Metric, p.Text)
			findings++
		}
		var parser expfmt.TextParser
		families, err := parser.TextToMetricFamilies(bytes.NewReader(text))
		if err != nil {
			fmt.Fprintf(os.Stderr, "promlint: %s: the exposition does not parse: %v\n", name, err)
			os.Exit(2)
		}
		if len(families) == 0 {
			fmt.Printf("%s: the exposition has no metric families\n", name)
			findings++
		}
		for family := range families {
			if !strings.HasPrefix(family, "rolemesh_") {
				fmt.Printf("%s: %s: not prefixed rolemesh_\n", name, family)
				findings++
			}
			for _, word := range timeWords {
				if strings.Contains(family, word) && !strings.HasSuffix(family, "_timestamp_seconds") {
					fmt.Printf("%s: %s: names a point in time (%q) but does not end in _timestamp_seconds\n", name, family, word)
					findings++
					break
				}
			}
		}
		fmt.Printf("%s: %d metric families checked\n", name, len(families))
	}
	if findings > 0 {
		fmt.Printf("%d finding(s)\n", findings)
		os.Exit(1)
	}
}

// fromOpenMetrics rewrites the metadata lines of an OpenMetrics exposition into the Prometheus text
// format; samples are the same in both.
func fromOpenMetrics(text []byte) []byte {
	lines := strings.Split(string(text), "\n")
	// HELP comes before TYPE, so the types are read first.
	renamed := map[string]string{}
	for _, line := range lines {
		fields := strings.Fields(line)
		if len(fields) == 4 && fields[0] == "#" && fields[1] == "TYPE" {
			switch fields[3] {
			case "counter":
				renamed[fields[2]] = fields[2] + "_total"
			case "info":
				renamed[fields[2]] = fields[2] + "_info"
			}
		}
	}
	var out bytes.Buffer
	for _, line := range lines {
		fields := strings.Fields(line)
		if len(fields) >= 2 && fields[0] == "#" && (fields[1] == "EOF" || fields[1] == "UNIT") {
			continue
		}
		if len(fields) == 4 && fields[0] == "#" && fields[1] == "TYPE" && fields[3] == "info" {
			line = "# TYPE " + fields[2] + " gauge"
		}
		if len(fields) >= 3 && fields[0] == "#" && (fields[1] == "TYPE" || fields[1] == "HELP") {
			if name, ok := renamed[fields[2]]; ok {
				line = strings.Replace(line, fields[2], name, 1)
			}
		}
		out.WriteString(line)
		out.WriteString("\n")
	}
	return out.Bytes()
}
