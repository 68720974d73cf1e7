"""Delegated MatrixRTC leave (MSC4140) jobs."""
