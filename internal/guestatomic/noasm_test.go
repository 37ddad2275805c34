//go:build !amd64 && !arm64

package guestatomic

var asmOps []ops
