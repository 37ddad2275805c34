//go:build amd64 || arm64

package guestatomic

var asmOps = []ops{{"asm", load32, store32, load64, swap64, or64}}
