from gpt2lab.cli.main import main

raise SystemExit(main())
