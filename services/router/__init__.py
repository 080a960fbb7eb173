"""Router: chooses the decode worker for each request."""
