"""Test support code shared by unit and black-box tests."""
