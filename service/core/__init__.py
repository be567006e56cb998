"""What every layer shares: typed errors and their codes, metrics, the version parser, call accounting and the
open-stream cap."""
