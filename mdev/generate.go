package mdev

// testdata/compat holds frozen byte streams of every device-state version
// (state-v1.bin, state-v2.bin) and of the migration-stream format (protocol
// version 1), written once by internal/genstreams, which encodes them by
// hand from the format descriptions, independently of this package. The
// compatibility tests decode them and check every field, so a change that
// breaks a format fails even when the encoder and the decoder change
// together. Regenerate only when adding a new version (next to, never over,
// the old files).
//go:generate go run ./internal/genstreams -dir testdata/compat
