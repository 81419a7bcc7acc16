from sluicegate.cli import app

app()
