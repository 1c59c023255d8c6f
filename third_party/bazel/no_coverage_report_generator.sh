#!/bin/sh
echo "bazel coverage is not set up for this repo (no network for @remote_coverage_tools); use pytest-cov." >&2
exit 1
