package mgmt_test

import "golang.org/x/sys/unix"

var errEEXIST = unix.EEXIST
