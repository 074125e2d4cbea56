#!/bin/sh
echo "remote_coverage_tools: not available offline; TuneForge measures coverage with pytest" >&2
exit 1
