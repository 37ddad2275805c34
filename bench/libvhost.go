package main

import "errors"

func newLibVhost() (vhostBackend, error) {
	return nil, errors.New("vdpakit vhost-user back-end not available in this tree yet")
}
