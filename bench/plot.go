package main

// WritePlots draws the charts.
func WritePlots(dir string, results []Result) ([]string, error) { return nil, nil }
