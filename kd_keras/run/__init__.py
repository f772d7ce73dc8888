"""Run folders: the files a run writes and the RunFolder that reads and writes them."""
