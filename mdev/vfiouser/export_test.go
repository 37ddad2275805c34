package vfiouser

// RetiredWindows is the number of unmapped windows whose address range
// waits for the data path to stop (dmaTable.graveyard).
func (s *Server) RetiredWindows() int { return int(s.retired.Load()) }
