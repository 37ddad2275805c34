package vfiouser

// RetiredWindows is the number of unmapped windows whose address range
// waits for the data path to stop (dmaTable.graveyard).
func (s *Server) RetiredWindows() int { return int(s.retired.Load()) }

// DMAReserved is the address space the DMA table holds: the windows mapped
// and the retired ranges.
func (s *Server) DMAReserved() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dma.reserved()
}

// DMAWindows is the number of DMA windows mapped.
func (s *Server) DMAWindows() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.dma.maps)
}
