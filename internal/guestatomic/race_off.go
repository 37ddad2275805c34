//go:build !race

package guestatomic

const raceBuild = false
