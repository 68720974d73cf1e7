"""rtcauthd: the MatrixRTC authorization service, a drop-in for lk-jwt-service."""

__version__ = "0.1.0"
