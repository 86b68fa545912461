"""What every stage shares and none owns: the command-line contract (one-line errors and exit
codes, :mod:`common.cli`) and file hashing (:mod:`common.hashing`)."""
