from tcopilot.cli import main

raise SystemExit(main())
