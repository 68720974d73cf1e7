"""twistd plugin: ``twistd rtcauth`` (kept tiny: plugin scans import this file)."""

from twisted.application.service import ServiceMaker

rtcauth = ServiceMaker(
    "rtcauthd",
    "rtcauthd.tap",
    "MatrixRTC authorization service (lk-jwt-service compatible)",
    "rtcauth",
)
