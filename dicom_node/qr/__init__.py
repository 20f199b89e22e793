"""Query/retrieve over the archive index: identifier matching and result building."""
