"""Matrix: server names, federation resolution, OpenID userinfo."""
