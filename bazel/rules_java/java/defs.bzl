"""A minimal, offline @rules_java for Debian's Bazel 4.2.3.

Bazel 4 registers its JDK toolchains (@bazel_tools//tools/jdk:all) for every
build, C++ only ones too, and their BUILD file loads these macros from
@rules_java, which the default WORKSPACE downloads. In Bazel 4 they are
thin wrappers of the native rules.
"""

def java_binary(**kwargs):
    native.java_binary(**kwargs)

def java_import(**kwargs):
    native.java_import(**kwargs)

def java_library(**kwargs):
    native.java_library(**kwargs)

def java_proto_library(**kwargs):
    native.java_proto_library(**kwargs)

def java_runtime(**kwargs):
    native.java_runtime(**kwargs)

def java_toolchain(**kwargs):
    native.java_toolchain(**kwargs)

def java_test(**kwargs):
    native.java_test(**kwargs)

def java_plugin(**kwargs):
    native.java_plugin(**kwargs)
