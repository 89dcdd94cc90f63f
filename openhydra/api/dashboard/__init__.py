"""The node's web dashboard: static page files (index.html, app.js, style.css) and the summary it polls."""
