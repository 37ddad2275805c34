package mdev

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Errors of the VFIO mdev sysfs interface.
var (
	ErrNoParent       = errors.New("mdev: no such mdev parent device")
	ErrUnknownType    = errors.New("mdev: parent does not support this mdev type")
	ErrNoInstances    = errors.New("mdev: no instances of this mdev type left")
	ErrInstanceExists = errors.New("mdev: an mdev with this UUID exists")
	ErrNoInstance     = errors.New("mdev: no mdev with this UUID")
	ErrInvalidUUID    = errors.New("mdev: invalid UUID")
	ErrSysfs          = errors.New("mdev: malformed sysfs attribute")
)

// UUID names an mdev instance.
type UUID [16]byte

// NewUUID returns a random (version 4, RFC 9562 variant) UUID.
func NewUUID() (UUID, error) {
	var u UUID
	if _, err := rand.Read(u[:]); err != nil {
		return u, err
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return u, nil
}

// ParseUUID parses the canonical 8-4-4-4-12 hex form.
func ParseUUID(s string) (UUID, error) {
	var u UUID
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, fmt.Errorf("%w: %q", ErrInvalidUUID, s)
	}
	h := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36]
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return UUID{}, fmt.Errorf("%w: %q", ErrInvalidUUID, s)
	}
	return u, nil
}

func (u UUID) String() string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// MdevType is one entry of a parent's mdev_supported_types.
type MdevType struct {
	ID                 string // directory name, e.g. "nvidia-35" or "mtty-2"
	Name               string // optional "name" attribute
	Description        string // optional "description" attribute
	DeviceAPI          string // "vfio-pci", ...
	AvailableInstances int
	Devices            []UUID // existing instances of this type
}

// Sysfs is the VFIO mediated device management interface under a sysfs
// root (/sys by default; tests point it at a fake tree):
//
//	<root>/class/mdev_bus/<parent>/mdev_supported_types/<type>/
//	    name description device_api available_instances create devices/
//	<root>/bus/mdev/devices/<uuid>/remove
type Sysfs struct {
	Root string
}

// NewSysfs returns the interface rooted at root ("" means /sys).
func NewSysfs(root string) *Sysfs {
	if root == "" {
		root = "/sys"
	}
	return &Sysfs{Root: root}
}

func (s *Sysfs) parentDir(parent string) (string, error) {
	if parent == "" || strings.ContainsAny(parent, "/\x00") || parent == "." || parent == ".." {
		return "", fmt.Errorf("%w: %q", ErrNoParent, parent)
	}
	dir := filepath.Join(s.Root, "class", "mdev_bus", parent)
	if _, err := os.Stat(filepath.Join(dir, "mdev_supported_types")); err != nil {
		return "", fmt.Errorf("%w: %s: %w", ErrNoParent, parent, err)
	}
	return dir, nil
}

// Parents lists the devices that can host mediated devices, sorted.
func (s *Sysfs) Parents() ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(s.Root, "class", "mdev_bus"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // no mdev-capable driver loaded
	}
	if err != nil {
		return nil, fmt.Errorf("mdev: list parents: %w", err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out, nil
}

// Types lists the mdev types parent supports, sorted by ID.
func (s *Sysfs) Types(parent string) ([]MdevType, error) {
	dir, err := s.parentDir(parent)
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(filepath.Join(dir, "mdev_supported_types"))
	if err != nil {
		return nil, fmt.Errorf("mdev: %s: list types: %w", parent, err)
	}
	var out []MdevType
	for _, e := range ents {
		t, err := s.readType(dir, e.Name())
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Type returns one type of parent.
func (s *Sysfs) Type(parent, typeID string) (MdevType, error) {
	dir, err := s.parentDir(parent)
	if err != nil {
		return MdevType{}, err
	}
	return s.readType(dir, typeID)
}

func (s *Sysfs) readType(parentDir, id string) (MdevType, error) {
	if id == "" || strings.ContainsAny(id, "/\x00") || id == "." || id == ".." {
		return MdevType{}, fmt.Errorf("%w: %q", ErrUnknownType, id)
	}
	dir := filepath.Join(parentDir, "mdev_supported_types", id)
	if _, err := os.Stat(filepath.Join(dir, "create")); err != nil {
		return MdevType{}, fmt.Errorf("%w: %s: %w", ErrUnknownType, id, err)
	}
	t := MdevType{ID: id}
	var err error
	t.Name, _ = readAttr(dir, "name") // optional
	t.Description, _ = readAttr(dir, "description")
	if t.DeviceAPI, err = readAttr(dir, "device_api"); err != nil {
		return t, err
	}
	avail, err := readAttr(dir, "available_instances")
	if err != nil {
		return t, err
	}
	n, err := strconv.Atoi(avail)
	if err != nil || n < 0 {
		return t, fmt.Errorf("%w: %s/available_instances = %q", ErrSysfs, dir, avail)
	}
	t.AvailableInstances = n
	ents, err := os.ReadDir(filepath.Join(dir, "devices"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return t, fmt.Errorf("mdev: %s: list devices: %w", dir, err)
	}
	for _, e := range ents {
		if u, err := ParseUUID(e.Name()); err == nil {
			t.Devices = append(t.Devices, u)
		}
	}
	return t, nil
}

func readAttr(dir, name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return "", fmt.Errorf("mdev: read %s/%s: %w", dir, name, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Create instantiates an mdev of typeID on parent named id (echo UUID >
// create). It reports ErrNoParent, ErrUnknownType, ErrNoInstances or
// ErrInstanceExists rather than the kernel's bare errno where it can.
func (s *Sysfs) Create(parent, typeID string, id UUID) error {
	dir, err := s.parentDir(parent)
	if err != nil {
		return err
	}
	t, err := s.readType(dir, typeID)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(s.Root, "bus", "mdev", "devices", id.String())); err == nil {
		return fmt.Errorf("%w: %s", ErrInstanceExists, id)
	}
	if t.AvailableInstances == 0 {
		return fmt.Errorf("%w: %s on %s", ErrNoInstances, typeID, parent)
	}
	err = writeAttr(filepath.Join(dir, "mdev_supported_types", typeID, "create"), id.String())
	switch {
	case errors.Is(err, unix.EEXIST):
		return fmt.Errorf("%w: %s: %w", ErrInstanceExists, id, err)
	case errors.Is(err, unix.EUSERS), errors.Is(err, unix.ENOSPC):
		return fmt.Errorf("%w: %s on %s: %w", ErrNoInstances, typeID, parent, err)
	case err != nil:
		return fmt.Errorf("mdev: create %s/%s %s: %w", parent, typeID, id, err)
	}
	return nil
}

// Remove destroys the mdev named id (echo 1 > remove).
func (s *Sysfs) Remove(id UUID) error {
	candidates := []string{filepath.Join(s.Root, "bus", "mdev", "devices", id.String(), "remove")}
	if parents, err := s.Parents(); err == nil {
		for _, p := range parents {
			candidates = append(candidates, filepath.Join(s.Root, "class", "mdev_bus", p, id.String(), "remove"))
		}
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err != nil {
			continue
		}
		if err := writeAttr(c, "1"); err != nil {
			return fmt.Errorf("mdev: remove %s: %w", id, err)
		}
		return nil
	}
	return fmt.Errorf("%w: %s", ErrNoInstance, id)
}

func writeAttr(path, v string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, werr := f.Write([]byte(v))
	cerr := f.Close()
	if werr != nil {
		return werr
	}
	return cerr
}
