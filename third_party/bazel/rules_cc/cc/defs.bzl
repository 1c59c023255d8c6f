"""Shim of @rules_cc//cc:defs.bzl: each rule is Bazel's built-in one.

Bazel 4.2.3's own @bazel_tools BUILD files load their C++ rules from here.
Real rules_cc releases are thin wrappers over the same native rules, but
Debian's packaged rules_cc (0.0.4) needs a newer Bazel, so this shim stands in
for it. This repo builds no C++.
"""

cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_shared_library = getattr(native, "cc_shared_library", None)
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_import = native.objc_import
objc_library = native.objc_library
