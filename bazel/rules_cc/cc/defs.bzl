"""A minimal, offline @rules_cc for Debian's Bazel 4.2.3.

Bazel 4's own @bazel_tools loads "@rules_cc//cc:defs.bzl" for its C++
toolchain, and its default WORKSPACE downloads rules_cc from GitHub to get it.
In Bazel 4 these macros are thin wrappers of the native rules, so this file
provides exactly that, and WORKSPACE points @rules_cc here (Debian's
bazel-rules-cc package targets newer Bazel: it needs `use_cpp_toolchain`).
"""

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_import(**kwargs):
    native.cc_import(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)

def cc_proto_library(**kwargs):
    native.cc_proto_library(**kwargs)

def objc_library(**kwargs):
    native.objc_library(**kwargs)

def objc_import(**kwargs):
    native.objc_import(**kwargs)

def fdo_profile(**kwargs):
    native.fdo_profile(**kwargs)

def fdo_prefetch_hints(**kwargs):
    native.fdo_prefetch_hints(**kwargs)
